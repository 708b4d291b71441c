/**
 * Prometheus' text exposition format (version 0.0.4). Every server computes
 * its figures at each scrape from what it already keeps (the controller from
 * its store, the storage server from its counters), so a client library's
 * registry of live metric objects would only hold copies of them.
 */
export const metricsContentType = 'text/plain; version=0.0.4; charset=utf-8';

export type Labels = Record<string, string>;

/** Observations already counted into buckets: counts[i] of them at most bounds[i] and above the bound before (not cumulative). */
export interface BucketCounts {
  counts: readonly number[];
  sum: number;
  count: number;
}

export class Exposition {
  readonly #lines: string[] = [];

  metric(name: string, type: 'counter' | 'gauge', help: string, samples: readonly (readonly [Labels, number])[]): void {
    this.#header(name, type, help);
    for (const [labels, value] of samples) this.#sample(name, labels, value);
  }

  histogram(name: string, help: string, buckets: readonly number[], observations: readonly number[]): void {
    this.bucketedHistogram(name, help, buckets, [[{}, countIntoBuckets(buckets, observations)]]);
  }

  /** One histogram series per label set, from counts its owner kept. */
  bucketedHistogram(name: string, help: string, bounds: readonly number[], series: readonly (readonly [Labels, BucketCounts])[]): void {
    this.#header(name, 'histogram', help);
    for (const [labels, { counts, sum, count }] of series) {
      let cumulative = 0;
      for (const [index, le] of bounds.entries()) {
        cumulative += counts[index] ?? 0;
        this.#sample(`${name}_bucket`, { ...labels, le: String(le) }, cumulative);
      }
      this.#sample(`${name}_bucket`, { ...labels, le: '+Inf' }, count);
      this.#sample(`${name}_sum`, labels, sum);
      this.#sample(`${name}_count`, labels, count);
    }
  }

  text(): string {
    return `${this.#lines.join('\n')}\n`;
  }

  #header(name: string, type: string, help: string): void {
    this.#lines.push(`# HELP ${name} ${help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`, `# TYPE ${name} ${type}`);
  }

  #sample(name: string, labels: Labels, value: number): void {
    const pairs = Object.entries(labels).map(([key, text]) => `${key}="${text.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`);
    this.#lines.push(`${name}${pairs.length ? `{${pairs.join(',')}}` : ''} ${value}`);
  }
}

/** The index of the first bucket bound at or above `value`, or bounds.length for one above them all. */
export function bucketIndex(bounds: readonly number[], value: number): number {
  const index = bounds.findIndex((le) => value <= le);
  return index < 0 ? bounds.length : index;
}

function countIntoBuckets(bounds: readonly number[], observations: readonly number[]): BucketCounts {
  const counts = bounds.map(() => 0);
  let sum = 0;
  for (const value of observations) {
    const index = bucketIndex(bounds, value);
    if (index < counts.length) counts[index] = (counts[index] ?? 0) + 1;
    sum += value;
  }
  return { counts, sum, count: observations.length };
}

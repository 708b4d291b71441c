/**
 * A line chart as a standalone SVG string, written by hand so the benchmarks
 * need no plotting dependency: linear axes with round ticks, one polyline per
 * series, dashed vertical markers with labels, a legend.
 */

export interface Series {
  name: string;
  color: string;
  points: { x: number; y: number }[];
  dashed?: boolean;
}

export interface Marker {
  x: number;
  label: string;
}

export interface Chart {
  title: string;
  /** One or more lines, separated by \n. */
  subtitle?: string;
  xLabel: string;
  yLabel: string;
  series: Series[];
  markers?: Marker[];
  width?: number;
  height?: number;
}

function escape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** About `count` round tick values (1, 2 or 5 × 10^n apart) from 0 to past max. */
export function ticks(max: number, count = 6): number[] {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? 10 * power;
  const values: number[] = [];
  for (let v = 0; v < max + step * 0.999; v += step) values.push(Number(v.toPrecision(12)));
  return values;
}

export function lineChart(chart: Chart): string {
  const width = chart.width ?? 820;
  const height = chart.height ?? 440;
  const subtitleLines = chart.subtitle ? chart.subtitle.split('\n') : [];
  const margin = { left: 70, right: 210, top: 44 + 16 * subtitleLines.length, bottom: 50 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const all = chart.series.flatMap((s) => s.points);
  const xTicks = ticks(Math.max(...all.map((p) => p.x), ...(chart.markers ?? []).map((m) => m.x), 0));
  const yTicks = ticks(Math.max(...all.map((p) => p.y), 0));
  const xMax = xTicks.at(-1) as number;
  const yMax = yTicks.at(-1) as number;
  const sx = (x: number): number => margin.left + (x / xMax) * plotW;
  const sy = (y: number): number => margin.top + plotH - (y / yMax) * plotH;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${width}" height="${height}" fill="white"/>`);
  out.push(`<text x="${margin.left}" y="22" font-size="15" font-weight="bold">${escape(chart.title)}</text>`);
  subtitleLines.forEach((line, i) => out.push(`<text x="${margin.left}" y="${40 + 16 * i}" fill="#555">${escape(line)}</text>`));
  for (const y of yTicks) {
    out.push(`<line x1="${margin.left}" x2="${margin.left + plotW}" y1="${sy(y).toFixed(1)}" y2="${sy(y).toFixed(1)}" stroke="#e4e4e4"/>`);
    out.push(`<text x="${margin.left - 6}" y="${(sy(y) + 4).toFixed(1)}" text-anchor="end">${y}</text>`);
  }
  for (const x of xTicks) {
    out.push(`<line x1="${sx(x).toFixed(1)}" x2="${sx(x).toFixed(1)}" y1="${margin.top + plotH}" y2="${margin.top + plotH + 5}" stroke="#333"/>`);
    out.push(`<text x="${sx(x).toFixed(1)}" y="${margin.top + plotH + 18}" text-anchor="middle">${x}</text>`);
  }
  out.push(`<rect x="${margin.left}" y="${margin.top}" width="${plotW}" height="${plotH}" fill="none" stroke="#333"/>`);
  out.push(`<text x="${margin.left + plotW / 2}" y="${height - 10}" text-anchor="middle">${escape(chart.xLabel)}</text>`);
  out.push(`<text transform="translate(16 ${margin.top + plotH / 2}) rotate(-90)" text-anchor="middle">${escape(chart.yLabel)}</text>`);
  (chart.markers ?? []).forEach((marker, i) => {
    const x = sx(marker.x).toFixed(1);
    out.push(`<line x1="${x}" x2="${x}" y1="${margin.top}" y2="${margin.top + plotH}" stroke="#999" stroke-dasharray="4 3"/>`);
    // Labels alternate in height so neighbouring markers stay readable.
    out.push(`<text x="${x}" y="${margin.top + 12 + (i % 3) * 13}" fill="#666" font-size="10" transform="translate(3 0)">${escape(marker.label)}</text>`);
  });
  for (const series of chart.series) {
    if (series.points.length === 0) continue;
    const points = series.points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(' ');
    out.push(`<polyline points="${points}" fill="none" stroke="${series.color}" stroke-width="2"${series.dashed ? ' stroke-dasharray="6 4"' : ''}/>`);
  }
  chart.series.forEach((series, i) => {
    const y = margin.top + 10 + i * 20;
    const x = margin.left + plotW + 14;
    out.push(`<line x1="${x}" x2="${x + 24}" y1="${y}" y2="${y}" stroke="${series.color}" stroke-width="3"${series.dashed ? ' stroke-dasharray="6 4"' : ''}/>`);
    out.push(`<text x="${x + 30}" y="${y + 4}">${escape(series.name)}</text>`);
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

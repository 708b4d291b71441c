/**
 * A seeded PRNG for the fuzz tests. Every case draws from its own generator,
 * derived from (seed, campaign, case number), so a failing case is reproduced
 * by its seed alone even though cases run concurrently and a campaign stops on
 * a time budget (which makes the number of cases, not their content, vary).
 */

/** The run's seed: FUZZ_SEED to reproduce a run, otherwise a fresh one (printed by the tests). */
export function fuzzSeed(): number {
  const fromEnv = process.env.FUZZ_SEED;
  if (fromEnv !== undefined && fromEnv !== '') {
    const seed = Number(fromEnv);
    if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`FUZZ_SEED must be a non-negative integer (got "${fromEnv}")`);
    return seed >>> 0;
  }
  return Math.floor(Math.random() * 2 ** 32) >>> 0;
}

/** FNV-1a over the parts: stable sub-seeds for (seed, campaign, case). */
function mix(...parts: (number | string)[]): number {
  let h = 0x811c9dc5;
  for (const part of parts) {
    for (const ch of `${part}/`) {
      h ^= ch.charCodeAt(0);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
  }
  return h >>> 0;
}

export class Rng {
  #state: number;

  constructor(seed: number, ...scope: (number | string)[]) {
    this.#state = scope.length ? mix(seed, ...scope) : seed >>> 0;
  }

  /** mulberry32: small, fast, and good enough to pick mutations. */
  next(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }

  /** An integer in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  u32(): number {
    return Math.floor(this.next() * 2 ** 32) >>> 0;
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new Error('pick from an empty list');
    return items[Math.floor(this.next() * items.length)] as T;
  }

  bytes(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) out[i] = Math.floor(this.next() * 256);
    return out;
  }
}

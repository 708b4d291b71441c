/**
 * When the test guest ran, seen from outside QEMU: the host time at which each
 * new ACK line appeared in its report logs (the source's, then the
 * destination's). The guest acknowledges a record every few ms while it runs,
 * so the longest silence during a migration is its pause, give or take one
 * record: a measure independent of QEMU's event timestamps.
 */
import { closeSync, openSync, readSync } from 'node:fs';

export interface AckArrival {
  log: string;
  at: number;
}

export class AckClock {
  readonly arrivals: AckArrival[] = [];
  readonly #logs: () => string[];
  readonly #read = new Map<string, { offset: number; partial: string }>();
  readonly #timer: NodeJS.Timeout;

  /** `logs` is asked at every poll: the destination's log exists only once it was prepared. */
  constructor(logs: () => string[], everyMs = 5) {
    this.#logs = logs;
    this.#timer = setInterval(() => this.#poll(), everyMs);
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#poll();
  }

  /** Arrivals from `log`, in order. */
  from(log: string): number[] {
    return this.arrivals.filter((a) => a.log === log).map((a) => a.at);
  }

  /** The longest time without a new ACK between `from` and `to` (host ms), with when it began. */
  longestSilence(from: number, to: number): { startedAt: number; ms: number } {
    const times = this.arrivals.map((a) => a.at).filter((t) => t >= from && t <= to).sort((a, b) => a - b);
    let longest = { startedAt: from, ms: 0 };
    for (let i = 1; i < times.length; i++) {
      const gap = (times[i] as number) - (times[i - 1] as number);
      if (gap > longest.ms) longest = { startedAt: times[i - 1] as number, ms: gap };
    }
    return longest;
  }

  #poll(): void {
    const now = Date.now();
    for (const log of this.#logs()) {
      const state = this.#read.get(log) ?? { offset: 0, partial: '' };
      let fd: number;
      try {
        fd = openSync(log, 'r');
      } catch {
        continue;
      }
      try {
        const buffer = Buffer.alloc(1 << 16);
        for (let n = readSync(fd, buffer, 0, buffer.length, state.offset); n > 0; n = readSync(fd, buffer, 0, buffer.length, state.offset)) {
          state.offset += n;
          const lines = (state.partial + buffer.subarray(0, n).toString('utf8')).split('\n');
          state.partial = lines.pop() ?? '';
          for (const line of lines) if (line.startsWith('ACK ')) this.arrivals.push({ log, at: now });
        }
      } finally {
        closeSync(fd);
      }
      this.#read.set(log, state);
    }
  }
}

/**
 * When the controller last touched each migration half on this host. The
 * controller drives a migration with a steady stream of requests (progress
 * polls, long waits for QEMU's events); a half that hears nothing for long has
 * lost its controller, and a paused guest would otherwise wait for one forever.
 */
export class ContactLog {
  readonly #halves = new Map<string, { inFlight: number; lastAt: number }>();

  /** Runs `call` as one contact: the half counts as attended until it returns. */
  async during<T>(key: string, call: () => Promise<T> | T): Promise<T> {
    const entry = this.#entry(key);
    entry.inFlight++;
    try {
      return await call();
    } finally {
      entry.inFlight--;
      entry.lastAt = Date.now();
    }
  }

  /** A contact that is over at once (a request that only records something). */
  touch(key: string): void {
    this.#entry(key).lastAt = Date.now();
  }

  /** Milliseconds since the last contact ended; 0 while one is under way. */
  idleMs(key: string): number {
    const entry = this.#halves.get(key);
    if (!entry) return 0;
    return entry.inFlight > 0 ? 0 : Date.now() - entry.lastAt;
  }

  forget(key: string): void {
    this.#halves.delete(key);
  }

  #entry(key: string): { inFlight: number; lastAt: number } {
    let entry = this.#halves.get(key);
    if (!entry) {
      entry = { inFlight: 0, lastAt: Date.now() };
      this.#halves.set(key, entry);
    }
    return entry;
  }
}

/** Runs tasks one at a time per key (a volume's name): each starts once the key's previous task has settled. */
export class KeyedQueue {
  readonly #tails = new Map<string, Promise<void>>();

  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    const previous = this.#tails.get(key) ?? Promise.resolve();
    const result = previous.then(task);
    // Forgotten in the very reaction that sees the task settle, so idle() never hands out a settled tail.
    const forget = (): void => {
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    };
    const tail: Promise<void> = result.then(forget, forget);
    this.#tails.set(key, tail);
    return result;
  }

  /** A promise that settles with the key's last queued task, or undefined when none is queued. */
  idle(key: string): Promise<void> | undefined {
    return this.#tails.get(key);
  }
}

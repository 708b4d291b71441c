/**
 * Undo actions registered as a test acquires things (processes, files), run
 * in reverse order even when the test fails, with every failure reported.
 */
export class Cleanup {
  readonly #actions: { what: string; run: () => unknown }[] = [];

  add(what: string, run: () => unknown): void {
    this.#actions.push({ what, run });
  }

  async run(): Promise<void> {
    const failures: string[] = [];
    for (const action of this.#actions.reverse()) {
      try {
        await action.run();
      } catch (err) {
        failures.push(`${action.what}: ${err instanceof Error ? err.message : String(err)}`);
      }
    }
    this.#actions.length = 0;
    if (failures.length) throw new Error(`cleanup failed: ${failures.join('; ')}`);
  }
}

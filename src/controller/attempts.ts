/**
 * A migration's attempts: QEMU under TCG sometimes loses memory writes in
 * pre-copy, the comparison at switch-over catches it and rolls back with the
 * guest intact on the source, and a new attempt usually gets through. Any
 * other outcome is final at once.
 */
import type { MigrationEvent, MigrationReport } from '../migration/phases.ts';

/** New attempts after a rollback for a memory mismatch (src/qemu/memory-digest.ts). */
const memoryMismatchRetries = 2;

export interface AttemptOptions {
  /** Runs one attempt, which reports its events to `onEvent`. */
  run(onEvent: (event: MigrationEvent) => void): Promise<MigrationReport>;
  /** Readies the source for another attempt: the rollback let go of it. */
  beforeRetry(): Promise<void>;
  /** Events of the migration as a whole. */
  onEvent(event: MigrationEvent): void;
  signal: AbortSignal;
}

/** Runs attempts until one is final; the report says how many it took when more than one. */
export async function runAttempts(options: AttemptOptions): Promise<MigrationReport> {
  for (let attempts = 1; ; attempts++) {
    // An attempt's final phase is held back until it is known to be final: watchers stop at "failed".
    let final: MigrationEvent | undefined;
    const report = await options.run((event) => {
      if (event.type === 'phase' && (event.phase === 'failed' || event.phase === 'cancelled')) final = event;
      else options.onEvent(event);
    });
    if (report.error?.code !== 'VMF_MEMORY_MISMATCH' || attempts > memoryMismatchRetries || options.signal.aborted) {
      if (final) options.onEvent(final);
      return attempts > 1 ? { ...report, attempts } : report;
    }
    options.onEvent({ type: 'escalation', action: 'retry', detail: `attempt ${attempts} rolled back (${report.error.message.slice(0, 80)}…); trying again` });
    await options.beforeRetry();
  }
}

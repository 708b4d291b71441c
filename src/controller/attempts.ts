/**
 * A migration's attempts: QEMU under TCG sometimes loses memory writes in
 * pre-copy, the comparison at switch-over catches it and rolls back with the
 * guest intact on the source, and a new attempt usually gets through. Any
 * other outcome is final at once.
 */
import type { AttemptSummary, MigrationEvent, MigrationReport } from '../migration/phases.ts';

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

/**
 * Runs attempts until one is final. The report is the last attempt's, except
 * that it covers every attempt where it says so: `totalMs` from the first
 * attempt's start, `attemptLog` with each attempt's figures and why it ended,
 * `allAttempts` with the sums.
 */
export async function runAttempts(options: AttemptOptions): Promise<MigrationReport> {
  const startedAt = Date.now();
  const log: AttemptSummary[] = [];
  for (let attempts = 1; ; attempts++) {
    // An attempt's final phase is held back until it is known to be final: watchers stop at "failed".
    let final: MigrationEvent | undefined;
    const report = await options.run((event) => {
      if (event.type === 'phase' && (event.phase === 'failed' || event.phase === 'cancelled')) final = event;
      else options.onEvent(event);
    });
    log.push(summarizeAttempt(report));
    if (report.error?.code !== 'VMF_MEMORY_MISMATCH' || attempts > memoryMismatchRetries || options.signal.aborted) {
      if (final) options.onEvent(final);
      return { ...report, totalMs: Date.now() - startedAt, ...(attempts > 1 ? { attempts } : {}), attemptLog: log, allAttempts: sumAttempts(log) };
    }
    options.onEvent({ type: 'escalation', action: 'retry', detail: `attempt ${attempts} rolled back (${report.error.message.slice(0, 80)}…); trying again` });
    await options.beforeRetry();
  }
}

export function summarizeAttempt(report: MigrationReport): AttemptSummary {
  const summary: AttemptSummary = {
    startedAt: report.phases[0]?.startedAt ?? Date.now() - report.totalMs,
    durationMs: report.totalMs,
    outcome: report.outcome,
    ramBytes: report.ram.transferredBytes,
    diskBytes: report.disks.reduce((sum, disk) => sum + disk.bytesSent, 0),
  };
  if (report.error) summary.error = report.error;
  if (report.downtimeMs !== undefined) summary.downtimeMs = report.downtimeMs;
  if (report.pauseMs !== undefined) summary.pauseMs = report.pauseMs;
  return summary;
}

function sumAttempts(log: AttemptSummary[]): NonNullable<MigrationReport['allAttempts']> {
  const sums: NonNullable<MigrationReport['allAttempts']> = {
    count: log.length,
    ramBytes: log.reduce((sum, a) => sum + a.ramBytes, 0),
    diskBytes: log.reduce((sum, a) => sum + a.diskBytes, 0),
  };
  // One attempt whose pause is not known makes the sum unknown, not smaller.
  if (log.every((a) => a.pauseMs !== undefined)) sums.pauseMs = log.reduce((sum, a) => sum + (a.pauseMs ?? 0), 0);
  return sums;
}

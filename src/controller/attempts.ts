/**
 * A migration's attempts: QEMU under TCG sometimes loses memory writes in
 * pre-copy, the comparison at switch-over catches it and rolls back with the
 * guest intact on the source, and a new attempt usually gets through; when the
 * user allowed a fallback, the last attempt runs in stop-and-copy, where the
 * guest does not run while its RAM moves. Any other outcome is final at once.
 */
import type { AttemptSummary, EscalationStep, MigrationEvent, MigrationReport } from '../migration/phases.ts';
import type { RamFallback, RamMode } from '../migration/plan.ts';

/** New attempts after a rollback for a memory mismatch (src/qemu/memory-digest.ts). */
const memoryMismatchRetries = 2;
/** Refusals for a memory mismatch after which the next attempt runs in the fallback mode. */
const mismatchesBeforeFallback = 2;

export interface AttemptOptions {
  /** Runs one attempt in `ramMode`, which reports its events to `onEvent`. */
  run(onEvent: (event: MigrationEvent) => void, ramMode: RamMode): Promise<MigrationReport>;
  /** The plan's RAM mode, and the one the user allowed as a fallback (--fallback). */
  ramMode: RamMode;
  fallback: RamFallback;
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
  const escalations: EscalationStep[] = [];
  let ramMode = options.ramMode;
  for (let attempts = 1; ; attempts++) {
    // An attempt's final phase is held back until it is known to be final: watchers stop at "failed".
    let final: MigrationEvent | undefined;
    const report = await options.run((event) => {
      if (event.type === 'phase' && (event.phase === 'failed' || event.phase === 'cancelled')) final = event;
      else options.onEvent(event);
    }, ramMode);
    const summary = summarizeAttempt(report, ramMode);
    log.push(summary);
    // The attempt counts its steps from its own start; the report, from the migration's.
    for (const step of report.escalations ?? []) escalations.push({ ...step, atMs: step.atMs + summary.startedAt - startedAt });
    if (report.error?.code !== 'VMF_MEMORY_MISMATCH' || attempts > memoryMismatchRetries || options.signal.aborted) {
      if (final) options.onEvent(final);
      return {
        ...report,
        totalMs: Date.now() - startedAt,
        ...(attempts > 1 ? { attempts } : {}),
        attemptLog: log,
        allAttempts: sumAttempts(log),
        ...(escalations.length > 0 ? { escalations } : {}),
      };
    }
    const next = nextRamMode(log, options.ramMode, options.fallback);
    const why = `attempt ${attempts} rolled back (${report.error.message.slice(0, 80)}…)`;
    const step: EscalationStep =
      next === ramMode
        ? { atMs: Date.now() - startedAt, action: 'retry', detail: `${why}; trying again` }
        : {
            atMs: Date.now() - startedAt,
            action: 'fallback',
            detail: `${why}; after ${mismatchesBeforeFallback} refusals for a memory mismatch, attempt ${attempts + 1} runs in ${next} (--fallback ${next}): the guest is stopped while its RAM moves`,
          };
    ramMode = next;
    escalations.push(step);
    options.onEvent({ type: 'escalation', action: step.action, detail: step.detail });
    await options.beforeRetry();
  }
}

/**
 * The RAM mode of the next attempt: the plan's, until `mismatchesBeforeFallback`
 * attempts were refused for a memory mismatch and the user allowed a fallback.
 * A mismatch comes from QEMU losing dirty-page tracking while the guest runs
 * during pre-copy (docs/QEMU-TCG-PRECOPY.md); stop-and-copy gives it nothing to lose.
 */
export function nextRamMode(log: readonly AttemptSummary[], planned: RamMode, fallback: RamFallback): RamMode {
  const mismatches = log.filter((a) => a.error?.code === 'VMF_MEMORY_MISMATCH').length;
  if (fallback === 'none' || mismatches < mismatchesBeforeFallback) return planned;
  return fallback;
}

export function summarizeAttempt(report: MigrationReport, ramMode: RamMode): AttemptSummary {
  const summary: AttemptSummary = {
    startedAt: report.phases[0]?.startedAt ?? Date.now() - report.totalMs,
    durationMs: report.totalMs,
    outcome: report.outcome,
    ramBytes: report.ram.transferredBytes,
    diskBytes: report.disks.reduce((sum, disk) => sum + disk.bytesSent, 0),
    ramMode: report.ramMode ?? ramMode,
    passes: report.ram.passes,
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

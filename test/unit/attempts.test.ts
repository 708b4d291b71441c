// The controller's retry after a memory-mismatch rollback. The attempts here
// are stand-ins returning reports: a real mismatch comes from a QEMU TCG bug
// that strikes at random (docs/QEMU-TCG-PRECOPY.md) and cannot be produced on
// demand; the executor's side of it (the rollback that keeps the guest on the
// source) is in test/migration/executor.test.ts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { renderReport } from '../../src/cli/render.ts';
import { nextRamMode, runAttempts } from '../../src/controller/attempts.ts';
import type { AttemptSummary, MigrationEvent, MigrationReport } from '../../src/migration/phases.ts';
import type { RamFallback, RamMode } from '../../src/migration/plan.ts';

function report(outcome: MigrationReport['outcome'], error?: MigrationReport['error']): MigrationReport {
  return {
    vm: 'web',
    from: 'A',
    to: 'B',
    outcome,
    ...(error ? { error } : {}),
    disks: [],
    ram: { transferredBytes: 0, totalBytes: 0, passes: 1, memoryCompared: outcome === 'completed' },
    phases: [],
    totalMs: 1,
    downtimeMs: outcome === 'completed' ? 30 : undefined,
  };
}

const mismatch = { code: 'VMF_MEMORY_MISMATCH', message: "the guest's memory on B differs from A in 3 of 512 1 MiB chunks" };

/** Attempts that end as `outcomes` say, each emitting its phases as the executor does. */
function scripted(outcomes: MigrationReport[], fallback: RamFallback = 'none') {
  const events: MigrationEvent[] = [];
  const modes: RamMode[] = [];
  let ran = 0;
  let readied = 0;
  return {
    events,
    modes,
    get ran() {
      return ran;
    },
    get readied() {
      return readied;
    },
    options: (signal = new AbortController().signal) => ({
      ramMode: 'live' as const,
      fallback,
      run: (onEvent: (event: MigrationEvent) => void, mode: RamMode = 'live') => {
        modes.push(mode);
        const outcome = outcomes[ran++] as MigrationReport;
        onEvent({ type: 'phase', phase: 'mirroring', at: ran });
        onEvent({ type: 'phase', phase: outcome.outcome, at: ran });
        return Promise.resolve(outcome);
      },
      beforeRetry: () => {
        readied++;
        return Promise.resolve();
      },
      onEvent: (event: MigrationEvent) => events.push(event),
      signal,
    }),
  };
}

const phases = (events: MigrationEvent[]) => events.flatMap((e) => (e.type === 'phase' ? [e.phase] : e.type === 'escalation' ? [e.action] : []));

test('a memory mismatch is tried again, and the report says it took two attempts', async () => {
  const run = scripted([report('failed', mismatch), report('completed')]);
  const final = await runAttempts(run.options());
  assert.equal(final.outcome, 'completed');
  assert.equal(final.attempts, 2);
  assert.equal(run.readied, 1, 'the source was readied once for the second attempt');
  // Watchers stop at "failed", so the first attempt's failure is not shown as a phase: a retry is.
  assert.deepEqual(phases(run.events), ['mirroring', 'retry', 'mirroring', 'completed']);
  const retry = run.events.find((e) => e.type === 'escalation');
  assert.match(retry?.type === 'escalation' ? retry.detail : '', /attempt 1 rolled back \(the guest's memory on B differs/);
});

test('the report covers every attempt: time from the first start, bytes and pauses of each, and why each ended', async () => {
  const attempt = (outcome: MigrationReport['outcome'], ramBytes: number, diskBytes: number, pauseMs: number, error?: MigrationReport['error']): MigrationReport => ({
    ...report(outcome, error),
    disks: [{ id: 'root', operation: 'mirror', bytesSent: diskBytes, virtualSize: 1 << 30 }],
    ram: { transferredBytes: ramBytes, totalBytes: 1 << 28, passes: error ? 5 : 3, memoryCompared: outcome === 'completed' },
    phases: [{ phase: 'preparing', startedAt: Date.now(), durationMs: 1 }],
    totalMs: 40,
    pauseMs,
  });
  const run = scripted([attempt('failed', 300e6, 5e6, 480, mismatch), attempt('completed', 200e6, 1e6, 350)]);
  const options = run.options();
  const slow = options.run;
  // Each attempt takes 40 ms, as its own report says.
  options.run = async (onEvent) => {
    await new Promise((resolve) => setTimeout(resolve, 40));
    return slow(onEvent);
  };
  const final = await runAttempts(options);
  assert.equal(final.outcome, 'completed');
  assert.ok(final.totalMs >= 80, `totalMs ${final.totalMs} counts both attempts, not the last one's 40 ms`);
  // The last attempt's own figures keep their names and meaning.
  assert.equal(final.ram.transferredBytes, 200e6);
  assert.equal(final.pauseMs, 350);
  assert.deepEqual(final.allAttempts, { count: 2, ramBytes: 500e6, diskBytes: 6e6, pauseMs: 830 });
  assert.deepEqual(final.attemptLog?.map((a) => [a.outcome, a.error?.code, a.ramBytes, a.diskBytes, a.pauseMs, a.passes]), [
    ['failed', 'VMF_MEMORY_MISMATCH', 300e6, 5e6, 480, 5],
    ['completed', undefined, 200e6, 1e6, 350, 3],
  ]);
  // What `vmferry migrate` prints: one line per attempt, then the sums.
  const shown = renderReport(final).split('\n');
  assert.match(shown[0] ?? '', /completed in [\d.]+ s, guest paused 350 ms \(QEMU's downtime 30 ms\), 2 attempts$/);
  assert.deepEqual(
    shown.filter((line) => /^ {2}(attempt \d|all attempts)/.test(line)).map((line) => line.replace(/after [\d.]+ s/, 'after T')),
    [
      '  attempt 1: failed (VMF_MEMORY_MISMATCH) after T, RAM 286.1 MiB in 5 passes and disks 4.8 MiB sent, guest paused 480 ms',
      '  attempt 2: completed after T, RAM 190.7 MiB in 3 passes and disks 976.6 KiB sent, guest paused 350 ms',
      '  all attempts: RAM 476.8 MiB and disks 5.7 MiB sent, guest paused 830 ms in all',
    ],
  );
});

test('after two retries a third mismatch is final, with its error and one "failed" phase', async () => {
  const run = scripted([report('failed', mismatch), report('failed', mismatch), report('failed', mismatch), report('completed')]);
  const final = await runAttempts(run.options());
  assert.equal(run.ran, 3);
  assert.equal(final.outcome, 'failed');
  assert.equal(final.error?.code, 'VMF_MEMORY_MISMATCH');
  assert.equal(final.attempts, 3);
  assert.deepEqual(phases(run.events), ['mirroring', 'retry', 'mirroring', 'retry', 'mirroring', 'failed']);
});

test('any other failure is final at once', async () => {
  const run = scripted([report('failed', { code: 'VMF_MIGRATION_FAILED', message: 'destination QEMU exited' }), report('completed')]);
  const final = await runAttempts(run.options());
  assert.equal(run.ran, 1);
  assert.equal(final.error?.code, 'VMF_MIGRATION_FAILED');
  assert.equal(final.attempts, undefined, 'one attempt is not worth mentioning');
  assert.deepEqual(phases(run.events), ['mirroring', 'failed']);
});

test('a cancelled migration is not tried again, even after a mismatch', async () => {
  const abort = new AbortController();
  abort.abort();
  const run = scripted([report('failed', mismatch), report('completed')]);
  const final = await runAttempts(run.options(abort.signal));
  assert.equal(run.ran, 1);
  assert.equal(run.readied, 0);
  assert.equal(final.outcome, 'failed');
});

test('with --fallback stop-and-copy, the attempt after two memory mismatches runs in stop-and-copy, and the report says so', async () => {
  const steps = [{ atMs: 5, action: 'downtime-limit' as const, detail: 'not converging' }];
  const run = scripted([{ ...report('failed', mismatch), escalations: steps }, report('failed', mismatch), { ...report('completed'), ramMode: 'stop-and-copy' }], 'stop-and-copy');
  const final = await runAttempts(run.options());
  assert.equal(final.outcome, 'completed');
  assert.deepEqual(run.modes, ['live', 'live', 'stop-and-copy']);
  assert.deepEqual(phases(run.events), ['mirroring', 'retry', 'mirroring', 'fallback', 'mirroring', 'completed']);
  assert.deepEqual(final.attemptLog?.map((a) => [a.ramMode, a.error?.code]), [
    ['live', 'VMF_MEMORY_MISMATCH'],
    ['live', 'VMF_MEMORY_MISMATCH'],
    ['stop-and-copy', undefined],
  ]);
  // Every step of the migration, in order: the first attempt's own, then the retry, then the fallback with why.
  assert.deepEqual(final.escalations?.map((e) => e.action), ['downtime-limit', 'retry', 'fallback']);
  assert.match(final.escalations?.[2]?.detail ?? '', /attempt 2 rolled back .*after 2 refusals for a memory mismatch, attempt 3 runs in stop-and-copy \(--fallback stop-and-copy\)/);
});

test('without --fallback, every attempt keeps the planned RAM mode', async () => {
  const run = scripted([report('failed', mismatch), report('failed', mismatch), report('completed')]);
  await runAttempts(run.options());
  assert.deepEqual(run.modes, ['live', 'live', 'live']);
  assert.deepEqual(phases(run.events), ['mirroring', 'retry', 'mirroring', 'retry', 'mirroring', 'completed']);
});

test('the fallback decision: only after two memory mismatches, only when allowed', () => {
  const attempt = (code?: string): AttemptSummary => ({ startedAt: 0, durationMs: 1, outcome: code ? 'failed' : 'completed', ramBytes: 0, diskBytes: 0, ramMode: 'live', passes: 3, ...(code ? { error: { code, message: '' } } : {}) });
  assert.equal(nextRamMode([], 'live', 'stop-and-copy'), 'live');
  assert.equal(nextRamMode([attempt('VMF_MEMORY_MISMATCH')], 'live', 'stop-and-copy'), 'live');
  assert.equal(nextRamMode([attempt('VMF_MEMORY_MISMATCH'), attempt('VMF_MEMORY_MISMATCH')], 'live', 'stop-and-copy'), 'stop-and-copy');
  assert.equal(nextRamMode([attempt('VMF_MEMORY_MISMATCH'), attempt('VMF_MEMORY_MISMATCH')], 'live', 'none'), 'live');
  assert.equal(nextRamMode([attempt('VMF_MEMORY_MISMATCH'), attempt('VMF_TIMEOUT')], 'live', 'stop-and-copy'), 'live', 'only memory mismatches count');
});

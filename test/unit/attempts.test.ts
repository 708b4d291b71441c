// The controller's retry after a memory-mismatch rollback. The attempts here
// are stand-ins returning reports: a real mismatch comes from a QEMU TCG bug
// that strikes at random (docs/QEMU-TCG-PRECOPY.md) and cannot be produced on
// demand; the executor's side of it (the rollback that keeps the guest on the
// source) is in test/migration/executor.test.ts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { runAttempts } from '../../src/controller/attempts.ts';
import type { MigrationEvent, MigrationReport } from '../../src/migration/phases.ts';

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
function scripted(outcomes: MigrationReport[]) {
  const events: MigrationEvent[] = [];
  let ran = 0;
  let readied = 0;
  return {
    events,
    get ran() {
      return ran;
    },
    get readied() {
      return readied;
    },
    options: (signal = new AbortController().signal) => ({
      run: (onEvent: (event: MigrationEvent) => void) => {
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
    ram: { transferredBytes: ramBytes, totalBytes: 1 << 28, passes: 3, memoryCompared: outcome === 'completed' },
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
  assert.deepEqual(final.attemptLog?.map((a) => [a.outcome, a.error?.code, a.ramBytes, a.diskBytes, a.pauseMs]), [
    ['failed', 'VMF_MEMORY_MISMATCH', 300e6, 5e6, 480],
    ['completed', undefined, 200e6, 1e6, 350],
  ]);
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

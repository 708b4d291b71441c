// The executor's state machine with fake sides (no QEMU): exact phase order,
// rollback order, and cancel/timeout/fault at every phase. The same executor
// runs against real QEMUs in test/migration/live.test.ts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../../src/errors.ts';
import { runMigration } from '../../src/migration/executor.ts';
import { renderReport } from '../../src/cli/render.ts';
import type { GuestReset, MigrationEvent, MigrationPhase } from '../../src/migration/phases.ts';
import { defaultMigrationOptions, planMigration, type MigrationOptions, type MigrationPlan } from '../../src/migration/plan.ts';
import type { DestinationSide, MigrationMilestone, SourceSide } from '../../src/migration/sides.ts';
import type { MigrationInfo, MigrationStatus } from '../../src/qmp/commands.ts';
import type { DestinationFate } from '../../src/migration/no-return.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';

const spec: VmSpec = {
  name: 'web',
  vcpus: 1,
  memoryMiB: 128,
  boot: { kind: 'kernel', kernel: '/k' },
  disks: [
    { id: 'root', source: { kind: 'file', path: '/pool/root.qcow2', format: 'qcow2' } },
    { id: 'data', source: { kind: 'nbd', server: { type: 'unix', path: '/s.sock' }, export: 'data' } },
  ],
};

function plan(deadlineS = 60, options: Partial<MigrationOptions> = {}, accelerator: 'tcg' | 'kvm' = 'tcg'): MigrationPlan {
  return planMigration(
    spec,
    { hostId: 'A', qemuVersion: '7.2', machineType: 'q35', accelerator, localDisks: { root: { virtualSize: 1 << 20, allocatedBytes: 1 << 19, backingFile: undefined } } },
    {
      hostId: 'B',
      address: '127.0.0.1',
      qemuVersion: '7.2',
      machineTypes: ['q35'],
      accelerator,
      cpu: { model: 'qemu64', unavailableFeatures: [] },
      freeMemoryMiB: 4096,
      poolFreeBytes: 1 << 30,
      reachableExports: { 'nbd+unix:///s.sock/data': 1 << 20 },
      vmNames: [],
    },
    { ...defaultMigrationOptions, deadlineS, ...options },
  );
}

/**
 * Fake sides that log every call; `hang` makes one call wait until the signal aborts. `milestoneAfter`: pre-copy
 * that never converges (each progress sample a new pass with as much left), reaching pre-switchover only once
 * that call was made (never, for 'never').
 */
function fakeSides(options: { hang?: string; fail?: string; destinationMemory?: string[]; sourceAlgorithm?: string; fate?: DestinationFate; milestoneAfter?: string; resets?: GuestReset[] } = {}) {
  const calls: string[] = [];
  let mirrorPolls = 0;
  let pass = 0;
  let called: (() => void) | undefined;
  const act = async (name: string, signal?: AbortSignal): Promise<void> => {
    calls.push(name);
    called?.();
    if (options.fail === name) throw new Error(`${name} broke`);
    if (options.hang === name) {
      await new Promise((_, reject) => signal?.addEventListener('abort', () => reject(signal.reason as Error), { once: true }));
    }
  };
  const memory = ['a0', 'b1', 'c2', 'd3'];
  /** QEMU's timestamp of the source's STOP; the destination's RESUME comes 350 ms later by the fakes' clocks. */
  const stoppedAtUs = 1_700_000_000_000_000;
  const info: MigrationInfo = {
    status: 'completed',
    downtime: 42,
    ram: { transferred: 1000, remaining: 0, total: 2000, duplicate: 0, normal: 0, 'normal-bytes': 0, 'dirty-pages-rate': 0, 'dirty-sync-count': 1, 'page-size': 4096, mbps: 1 },
  };
  const destination: DestinationSide = {
    hostId: 'B',
    prepare: async (_s, _p, signal) => {
      await act('dst.prepare', signal);
      return { migrationUri: 'tcp:127.0.0.1:1', tls: false, mirrorTargets: [{ diskId: 'root', sync: 'top', server: { type: 'unix', path: '/n' }, exportName: 'root', tls: false }] };
    },
    waitIncomingCompleted: (signal) => act('dst.waitIncomingCompleted', signal),
    waitIncomingRunnable: async (signal) => {
      await act('dst.waitIncomingRunnable', signal);
      return 'postcopy';
    },
    memoryDigest: async (signal) => {
      await act('dst.memoryDigest', signal);
      await sleep(40);
      return { algorithm: 'xxh64', chunkBytes: 1 << 20, chunks: options.destinationMemory ?? memory };
    },
    resume: async (signal) => {
      await act('dst.resume', signal);
      return { resumedAtUs: stoppedAtUs + 350_000 };
    },
    recoverPostcopy: async (signal) => {
      await act('dst.recoverPostcopy', signal);
      return 'tcp:127.0.0.1:2';
    },
    postcopyResets: async (signal) => {
      await act('dst.postcopyResets', signal);
      return options.resets ?? [];
    },
    fate: async (signal) => {
      await act('dst.fate', signal);
      return options.fate ?? 'never-ran';
    },
    rollback: () => act('dst.rollback'),
  };
  const source: SourceSide = {
    hostId: 'A',
    startMirrors: (_t, _m, _b, signal) => act('src.startMirrors', signal),
    mirrorStatus: async (signal) => {
      await act('src.mirrorStatus', signal);
      mirrorPolls++;
      return [{ diskId: 'root', offset: mirrorPolls * 100, len: 200, ready: mirrorPolls >= 2 }];
    },
    startMigration: (_u, _s, signal) => act('src.startMigration', signal),
    migrationInfo: () => {
      if (!options.milestoneAfter) return Promise.resolve(info);
      pass++;
      return Promise.resolve({ status: 'active', ram: { ...(info.ram as NonNullable<MigrationInfo['ram']>), remaining: 500, 'dirty-sync-count': pass } });
    },
    waitMilestone: async (signal): Promise<MigrationMilestone> => {
      await act('src.waitMilestone', signal);
      const after = options.milestoneAfter;
      // No timer: a migration that fails leaves this wait behind, and a timer would keep the test process alive.
      if (after !== undefined) {
        await new Promise<void>((resolve, reject) => {
          called = () => calls.includes(after) && resolve();
          called();
          signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true });
        });
      }
      return 'pre-switchover';
    },
    setDowntimeLimit: (_ms, signal) => act('src.setDowntimeLimit', signal),
    releaseThrottle: (signal) => act('src.releaseThrottle', signal),
    startPostcopy: (signal) => act('src.startPostcopy', signal),
    pausePostcopy: (signal) => act('src.pausePostcopy', signal),
    resumePostcopy: (_uri, signal) => act('src.resumePostcopy', signal),
    stopGuest: (signal) => act('src.stopGuest', signal),
    finishMirrors: async (signal) => {
      await act('src.finishMirrors', signal);
      return [{ diskId: 'root', bytesSent: 200 }];
    },
    continueSwitchover: (signal) => act('src.continueSwitchover', signal),
    memoryDigest: async (signal) => {
      await act('src.memoryDigest', signal);
      return { algorithm: options.sourceAlgorithm ?? 'xxh64', chunkBytes: 1 << 20, chunks: memory };
    },
    completedInfo: async (signal) => {
      await act('src.completedInfo', signal);
      return { info, stoppedAtUs };
    },
    retire: () => act('src.retire'),
    rollback: async () => {
      await act('src.rollback');
      return { pauseMs: 120 };
    },
  };
  return { calls, source, destination, act };
}

function phasesOf(events: MigrationEvent[]): MigrationPhase[] {
  return events.flatMap((e) => (e.type === 'phase' ? [e.phase] : []));
}

test('a successful migration walks the phases in order and reports per-disk operations', async () => {
  const { calls, source, destination } = fakeSides();
  const events: MigrationEvent[] = [];
  const report = await runMigration({ spec, plan: plan(), source, destination, onEvent: (e) => events.push(e), pollIntervalMs: 1 });
  assert.deepEqual(phasesOf(events), ['preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'resume-sent', 'resumed', 'source-retired', 'completed']);
  assert.deepEqual(
    calls.filter((c) => c !== 'src.mirrorStatus'),
    // The source's digest starts once the mirrors have drained and the rest of the RAM is on its way: it
    // overlaps the destination's completion, not the part of the pause QEMU counts as downtime.
    // The final figures are asked for while the memory is compared, so reading them adds nothing to the pause.
    ['dst.prepare', 'src.startMirrors', 'src.startMigration', 'src.waitMilestone', 'src.finishMirrors', 'src.continueSwitchover', 'src.memoryDigest',
      'dst.waitIncomingCompleted', 'src.completedInfo', 'dst.memoryDigest', 'dst.resume', 'src.retire'],
  );
  assert.equal(report.outcome, 'completed');
  assert.equal(report.ram.memoryCompared, true, 'a TCG guest has its memory compared before it resumes');
  assert.ok((report.ram.compareMs ?? 0) >= 40 && (report.ram.compareMs ?? 0) < 1000, `the comparison's share of the pause is counted: ${report.ram.compareMs} ms`);
  assert.match(renderReport(report), /guest memory identical at both ends before the destination ran \(checked: TCG guest, \d+ ms of the pause\)/);
  assert.equal(report.downtimeMs, 42);
  assert.equal(report.pauseMs, 350, "the source's STOP to the destination's RESUME, by QEMU's event timestamps");
  assert.equal(report.ram.passes, 1, "QEMU's dirty-sync-count");
  assert.deepEqual(report.disks.map((d) => [d.id, d.operation, d.bytesSent]), [['root', 'mirror', 200], ['data', 'reattach', 0]]);
  assert.deepEqual(report.phases.map((p) => p.phase), ['preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'resume-sent', 'resumed', 'source-retired', 'completed']);
  const diskEvents = events.filter((e) => e.type === 'disks');
  assert.ok(diskEvents.length >= 2, 'mirror progress was reported');
});

// Found in CI: a RAM phase shorter than one poll left `vmferry --json migrate` without a single RAM line.
test('a RAM phase shorter than one poll still reports its RAM: the stream holds the figures QEMU finished with, once the guest runs on B', async () => {
  const { source, destination } = fakeSides();
  const events: MigrationEvent[] = [];
  // The milestone comes at once and the poll would wait a minute: no sample is taken while the RAM moves.
  const report = await runMigration({ spec, plan: plan(), source, destination, onEvent: (e) => events.push(e), pollIntervalMs: 60_000 });
  assert.equal(report.outcome, 'completed');
  const ram = events.flatMap((e) => (e.type === 'ram' ? [e.ram] : []));
  assert.deepEqual(ram.map((r) => [r.transferredBytes, r.remainingBytes]), [[report.ram.transferredBytes, 0]]);
  const order = events.flatMap((e) => (e.type === 'phase' ? [e.phase] : e.type === 'ram' ? ['ram'] : []));
  assert.ok(order.indexOf('ram') > order.indexOf('resumed'), order.join(' → '));
});

test('memory that differs between the ends keeps the guest on the source: the destination is never resumed', async () => {
  const { calls, source, destination } = fakeSides({ destinationMemory: ['a0', 'XX', 'c2', 'YY'] });
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.equal(report.error?.code, 'VMF_MEMORY_MISMATCH');
  assert.match(report.error?.message ?? '', /memory on B differs from A in 2 of 4 1 MiB chunks \(at 1 MiB, 3 MiB\)/);
  assert.ok(!calls.includes('dst.resume'), 'the destination never ran');
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
  assert.equal(report.ram.memoryCompared, false);
  assert.equal(report.pauseMs, 120, 'the pause the guest lived through on the source, STOP to its RESUME by the rollback');
  assert.equal(report.ram.transferredBytes, 1000, "the attempt's final RAM figure");
});

test('a pause whose events were not seen is not reported (no default); a guest never stopped paused 0 ms', async () => {
  const unseen = fakeSides();
  unseen.destination.resume = () => Promise.resolve({ resumedAtUs: null });
  const report = await runMigration({ spec, plan: plan(), source: unseen.source, destination: unseen.destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed');
  assert.equal(report.pauseMs, undefined);
  assert.equal(report.downtimeMs, 42);
  const early = fakeSides({ fail: 'src.startMirrors' });
  const failed = await runMigration({ spec, plan: plan(), source: early.source, destination: early.destination, pollIntervalMs: 1 });
  assert.equal(failed.outcome, 'failed');
  assert.equal(failed.pauseMs, 0);
});

test('digests from agents that hash differently are refused, not read as a memory mismatch', async () => {
  const { calls, source, destination } = fakeSides({ sourceAlgorithm: 'sha256' });
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.equal(report.error?.code, 'VMF_MIGRATION_FAILED');
  assert.match(report.error?.message ?? '', /memory digests are not comparable \(sha256 per 1048576 bytes against xxh64/);
  assert.ok(!calls.includes('dst.resume'));
});

test('a switch-over that fails while the source is still hashing stops the hashing before the rollback resumes the guest', async () => {
  const { calls, source, destination } = fakeSides({ hang: 'src.memoryDigest', fail: 'dst.waitIncomingCompleted' });
  let digestAborted = false;
  const digest = source.memoryDigest.bind(source);
  source.memoryDigest = (signal) => {
    signal.addEventListener('abort', () => (digestAborted = true), { once: true });
    return digest(signal);
  };
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.match(report.error?.message ?? '', /dst.waitIncomingCompleted broke/);
  assert.ok(digestAborted, 'the source digest was abandoned');
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
});

test('a source digest that fails fails the migration at the comparison, and the guest stays on the source', async () => {
  const { calls, source, destination } = fakeSides({ fail: 'src.memoryDigest' });
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.match(report.error?.message ?? '', /src.memoryDigest broke/);
  assert.ok(!calls.includes('dst.resume'));
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
});

test('a KVM guest skips the memory comparison', async () => {
  const { calls, source, destination } = fakeSides({ destinationMemory: ['would', 'not', 'match'] });
  const kvmPlan = { ...plan(), ram: { ...plan().ram, compareMemory: false } };
  const report = await runMigration({ spec, plan: kvmPlan, source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed');
  assert.ok(!calls.some((c) => c.endsWith('memoryDigest')));
});

const steps: { step: string; phase: MigrationPhase; undo: string[] }[] = [
  { step: 'dst.prepare', phase: 'preparing', undo: ['dst.rollback', 'src.rollback'] },
  { step: 'src.startMirrors', phase: 'mirroring', undo: ['dst.rollback', 'src.rollback'] },
  { step: 'src.waitMilestone', phase: 'migrating', undo: ['dst.rollback', 'src.rollback'] },
  { step: 'src.finishMirrors', phase: 'paused-at-switchover', undo: ['dst.rollback', 'src.rollback'] },
  { step: 'dst.waitIncomingCompleted', phase: 'paused-at-switchover', undo: ['dst.rollback', 'src.rollback'] },
  { step: 'dst.memoryDigest', phase: 'paused-at-switchover', undo: ['dst.rollback', 'src.rollback'] },
];

for (const { step, phase, undo } of steps) {
  test(`a failure in ${step} rolls back, destination first, and reports failed`, async () => {
    const { calls, source, destination } = fakeSides({ fail: step });
    const events: MigrationEvent[] = [];
    const report = await runMigration({ spec, plan: plan(), source, destination, onEvent: (e) => events.push(e), pollIntervalMs: 1 });
    assert.equal(report.outcome, 'failed');
    assert.match(report.error?.message ?? '', new RegExp(`${step} broke`));
    assert.deepEqual(calls.slice(calls.indexOf(step) + 1), undo);
    assert.deepEqual(phasesOf(events).slice(-3), [phase, 'rolling-back', 'failed']);
    assert.ok(!calls.includes('src.retire'), 'the source is never retired after a failure');
  });

  test(`a cancel while in ${step} rolls back and reports cancelled`, async () => {
    const { calls, source, destination } = fakeSides({ hang: step });
    const controller = new AbortController();
    const running = runMigration({ spec, plan: plan(), source, destination, signal: controller.signal, pollIntervalMs: 1 });
    while (!calls.includes(step)) await new Promise((resolve) => setImmediate(resolve));
    controller.abort();
    const report = await running;
    assert.equal(report.outcome, 'cancelled');
    assert.equal(report.error?.code, 'VMF_ABORTED');
    assert.deepEqual(calls.slice(calls.indexOf(step) + 1), undo);
  });
}

test('past the deadline the migration rolls back and says it timed out', async () => {
  const { calls, source, destination } = fakeSides({ hang: 'src.waitMilestone' });
  const report = await runMigration({ spec, plan: plan(0.2), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.equal(report.error?.code, 'VMF_TIMEOUT');
  assert.match(report.error?.message ?? '', /migration of web to B \(--deadline\) did not finish within 200 ms/);
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
});

test('a mirror that stops moving (a cut link) fails the migration after the stall timeout, long before the overall one', async () => {
  const { calls, source, destination } = fakeSides();
  source.mirrorStatus = () => Promise.resolve([{ diskId: 'root', offset: 100, len: 200, ready: false }]);
  const stalled = { ...plan(60), options: { ...plan(60).options, stallTimeoutS: 0.2 } };
  const started = Date.now();
  const report = await runMigration({ spec, plan: stalled, source, destination, pollIntervalMs: 10 });
  assert.equal(report.outcome, 'failed');
  assert.match(report.error?.message ?? '', /the disk mirrors made no progress/);
  assert.ok(Date.now() - started < 5_000);
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
});

test('a mirror that fails during the RAM phase (its target full) fails the migration then, not at switch-over', async () => {
  const { calls, source, destination } = fakeSides({ hang: 'src.waitMilestone' });
  let polls = 0;
  source.mirrorStatus = () => {
    polls++;
    const error = polls > 1 ? { error: 'No space left on device' } : {};
    return Promise.resolve([{ diskId: 'root', offset: 200, len: 200, ready: true, ...error }]);
  };
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 5 });
  assert.equal(report.outcome, 'failed');
  assert.equal(report.error?.message, 'mirror of disk root failed during the RAM phase: No space left on device');
  assert.ok(!calls.includes('src.finishMirrors'));
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
});

test('RAM that stops moving fails the migration after the stall timeout', async () => {
  const { source, destination } = fakeSides({ hang: 'src.waitMilestone' });
  const stalled = { ...plan(60), options: { ...plan(60).options, stallTimeoutS: 0.2 } };
  const report = await runMigration({ spec, plan: stalled, source, destination, pollIntervalMs: 10 });
  assert.equal(report.outcome, 'failed');
  assert.match(report.error?.message ?? '', /the RAM migration made no progress/);
});

test('a progress query QEMU never answers (its main loop stuck on a dead link) is a stall too', async () => {
  const { calls, source, destination } = fakeSides({ hang: 'src.waitMilestone' });
  source.migrationInfo = (signal) =>
    new Promise((_, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true }));
  const stalled = { ...plan(60), options: { ...plan(60).options, stallTimeoutS: 0.2 } };
  const started = Date.now();
  const report = await runMigration({ spec, plan: stalled, source, destination, pollIntervalMs: 10 });
  assert.equal(report.outcome, 'failed');
  assert.equal(report.error?.code, 'VMF_MIGRATION_FAILED');
  assert.match(report.error?.message ?? '', /the RAM migration made no progress: QEMU did not report any for 0.2 s \(is the network/);
  assert.ok(Date.now() - started < 5_000);
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
});

test('after the destination resumed, nothing is rolled back even if the source fails to retire', async () => {
  const { calls, source, destination } = fakeSides({ fail: 'src.retire' });
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed');
  assert.ok(!calls.includes('src.rollback') && !calls.includes('dst.rollback'));
});

test('rollback failures are attached to the first error, not instead of it', async () => {
  const sides = fakeSides({ fail: 'src.finishMirrors' });
  sides.source.rollback = () => Promise.reject(new Error('QEMU gone'));
  const report = await runMigration({ spec, plan: plan(), source: sides.source, destination: sides.destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.match(report.error?.message ?? '', /^src\.finishMirrors broke; rollback problems: roll back source A: QEMU gone$/);
  assert.ok(sides.calls.includes('dst.rollback'), 'the other undo still ran');
});

test('a refused plan throws before any side is touched', async () => {
  const { calls, source, destination } = fakeSides();
  const refused = { ...plan(), refusals: ['disk data: B cannot reach shared volume x'] };
  await assert.rejects(runMigration({ spec, plan: refused, source, destination }), /refused: disk data: B cannot reach/);
  assert.deepEqual(calls, []);
});

// Faults between the resume and its reply (issue 13, problem 1): the source must never run beside the destination.

test('a resume whose reply is lost, on a destination whose guest runs: the migration completes and the source is never resumed', async () => {
  const { calls, source, destination } = fakeSides({ fail: 'dst.resume', fate: 'guest-ran' });
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1 });
  assert.ok(!calls.includes('src.rollback'), 'the source was not resumed beside the destination');
  assert.ok(!calls.includes('dst.rollback'));
  assert.equal(report.outcome, 'completed');
  assert.deepEqual(calls.slice(calls.indexOf('dst.resume')), ['dst.resume', 'dst.fate', 'src.retire']);
  assert.equal(report.pauseMs, undefined, "the destination's RESUME was never reported, so the pause is not known");
  assert.match(report.recovery ?? '', /dst.resume broke; B then confirmed that the guest ran there, so it lives there now/);
});

test('a resume that failed on a destination whose guest never ran: the destination is rolled back before the source resumes', async () => {
  const { calls, source, destination } = fakeSides({ fail: 'dst.resume', fate: 'never-ran' });
  const report = await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.deepEqual(calls.slice(calls.indexOf('dst.resume')), ['dst.resume', 'dst.fate', 'dst.rollback', 'src.rollback']);
});

test('a resume that failed on a destination that cannot tell: unresolved, the source stays paused, nothing is retired', async () => {
  const sides = fakeSides({ fail: 'dst.resume' });
  sides.destination.fate = () => Promise.reject(new Error('connect ECONNREFUSED'));
  const phases: string[] = [];
  const report = await runMigration({ spec, plan: plan(), source: sides.source, destination: sides.destination, pollIntervalMs: 1, recordPhase: (p) => Promise.resolve(void phases.push(p)) });
  assert.equal(report.outcome, 'unresolved');
  assert.equal(report.error?.code, 'VMF_UNRESOLVED');
  assert.match(report.error?.message ?? '', /B could not say whether the guest ran there: connect ECONNREFUSED\. web stays paused on A/);
  assert.ok(!sides.calls.some((c) => ['src.rollback', 'src.retire', 'dst.rollback'].includes(c)));
  assert.equal(phases.at(-1), 'unresolved', 'stored, so that a controller keeps asking');
});

test('a destination rollback that fails past the point of no return leaves the source paused (unresolved)', async () => {
  const sides = fakeSides({ fail: 'dst.resume', fate: 'never-ran' });
  sides.destination.rollback = () => Promise.reject(new Error('agent B gone'));
  const report = await runMigration({ spec, plan: plan(), source: sides.source, destination: sides.destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'unresolved');
  assert.ok(!sides.calls.includes('src.rollback'));
});

test('a cancel while the resume is in flight does not interrupt it: the migration completes, the source is never resumed', async () => {
  const sides = fakeSides();
  const controller = new AbortController();
  let release: () => void = () => undefined;
  sides.destination.resume = async () => {
    sides.calls.push('dst.resume');
    controller.abort();
    await new Promise<void>((resolve) => (release = resolve));
    return { resumedAtUs: null };
  };
  const running = runMigration({ spec, plan: plan(), source: sides.source, destination: sides.destination, signal: controller.signal, pollIntervalMs: 1 });
  while (!sides.calls.includes('dst.resume')) await new Promise((resolve) => setImmediate(resolve));
  release();
  const report = await running;
  assert.equal(report.outcome, 'completed');
  assert.ok(!sides.calls.includes('src.rollback'));
});

test('the phase is stored before the step it names acts: resume-sent before the resume request', async () => {
  const { calls, source, destination } = fakeSides();
  const stored: string[] = [];
  await runMigration({ spec, plan: plan(), source, destination, pollIntervalMs: 1, recordPhase: (p) => Promise.resolve(void stored.push(`${p}@${calls.length}`)) });
  const resumeAt = calls.indexOf('dst.resume');
  assert.ok(stored.includes(`resume-sent@${resumeAt}`), `stored ${stored.join(', ')}; resume was call ${resumeAt}`);
  assert.deepEqual(stored.map((s) => s.split('@')[0]), ['preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'resume-sent', 'resumed', 'source-retired']);
});

test('a source whose agent cannot be reached for the rollback: unresolved, not failed, so that someone keeps trying to resume its guest', async () => {
  const sides = fakeSides({ fail: 'src.continueSwitchover' });
  sides.source.rollback = () => Promise.reject(new VmferryError('VMF_UNREACHABLE', 'cannot reach http://10.0.0.2:10801: ECONNREFUSED'));
  const report = await runMigration({ spec, plan: plan(), source: sides.source, destination: sides.destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'unresolved');
  assert.match(report.error?.message ?? '', /the rollback of A could not reach its agent .*; vmferry keeps trying/);
  assert.ok(sides.calls.includes('dst.rollback'), 'the destination was rolled back first');
});

// Post-copy (issue 16): the destination runs the guest before all of its RAM is there, so from the continue into
// post-copy the source never runs again, whatever fails.

/**
 * Fake sides of a guest pre-copy cannot move: QEMU stops at pre-switchover only once post-copy was asked for, then
 * reports postcopy-active and `end` (completed, or postcopy-paused for a cut link). A resumed stream completes
 * when `linkBack` (the link came back), and pauses again otherwise.
 */
function postcopySides(options: Parameters<typeof fakeSides>[0] & { end?: MigrationMilestone; linkBack?: boolean; passes?: number } = {}) {
  const sides = fakeSides(options);
  const { source, act } = sides;
  const queue: MigrationMilestone[] = [];
  let status: MigrationStatus = 'active';
  const ram = { transferred: 5000, remaining: 9000, total: 20000, duplicate: 0, normal: 0, 'normal-bytes': 0, 'dirty-pages-rate': 0, 'dirty-sync-count': options.passes ?? 2, 'page-size': 4096, mbps: 1 };
  source.startPostcopy = async (signal) => {
    await act('src.startPostcopy', signal);
    queue.push('pre-switchover');
  };
  source.continueSwitchover = async (signal) => {
    await act('src.continueSwitchover', signal);
    queue.push('postcopy-active', options.end ?? 'completed');
  };
  source.waitMilestone = async (signal) => {
    await act('src.waitMilestone', signal);
    // Rejects with the signal's reason as soon as it aborts, as the real sides' waits do.
    const aborted = new Promise<never>((_, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true }));
    aborted.catch(() => undefined);
    for (;;) {
      const next = queue.shift();
      if (next) return (status = next);
      await Promise.race([aborted, sleep(1)]);
    }
  };
  source.migrationInfo = () => Promise.resolve({ status, ram: { ...ram, transferred: ram.transferred++ } });
  source.resumePostcopy = async (_uri, signal) => {
    await act('src.resumePostcopy', signal);
    queue.push('postcopy-active', options.linkBack ? 'completed' : 'postcopy-paused');
  };
  source.completedInfo = async (signal) => {
    await act('src.completedInfo', signal);
    return { info: { status: 'completed', downtime: 42, ram: { ...ram, remaining: 0, 'postcopy-requests': 7 } }, stoppedAtUs: 1_700_000_000_000_000, postcopyMs: 900 };
  };
  return sides;
}

test('post-copy mode: after the first pass the mirrors finish, the destination resumes in postcopy-active, the source retires once completed', async () => {
  const { calls, source, destination } = postcopySides();
  const events: MigrationEvent[] = [];
  const report = await runMigration({ spec, plan: plan(60, { ramMode: 'postcopy' }, 'kvm'), source, destination, onEvent: (e) => events.push(e), pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.deepEqual(phasesOf(events), ['preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'postcopy-started', 'postcopy-active', 'resumed', 'source-retired', 'completed']);
  assert.deepEqual(
    calls.filter((c) => c !== 'src.mirrorStatus' && c !== 'src.waitMilestone'),
    // The mirrors finish before the continue lets QEMU inactivate the images, and B runs only after both.
    ['dst.prepare', 'src.startMirrors', 'src.startMigration', 'src.startPostcopy', 'src.finishMirrors', 'src.continueSwitchover', 'dst.waitIncomingRunnable', 'dst.resume', 'dst.postcopyResets', 'src.completedInfo', 'src.retire'],
  );
  assert.ok(!calls.some((c) => c.endsWith('memoryDigest')), 'no memory comparison: RAM is still in flight when B starts');
  assert.equal(report.ram.memoryCompared, false);
  assert.match(report.ram.postcopyWhy ?? '', /the first pass of pre-copy is done/);
  assert.equal(report.ram.postcopyMs, 900);
  assert.equal(report.ram.postcopyRequests, 7);
  assert.deepEqual(report.ram.postcopyResets, [], 'B was asked whether the guest reset there: it did not');
  assert.equal(report.pauseMs, 350);
  const escalation = events.find((e) => e.type === 'escalation');
  assert.ok(escalation?.type === 'escalation' && escalation.action === 'postcopy' && /first pass/.test(escalation.detail), 'the switch is in the event stream with why');
});

// QEMU 7.2 under TCG loses writes to pages pre-copy already sent, and post-copy never sends those again: the guest
// crashed on B (docs/QEMU-TCG-PRECOPY.md, "Post-copy"). Before the first pass ends (QEMU's one sync so far) it switches.
test('post-copy mode of a TCG guest switches as soon as RAM moves, not after the first pass', async () => {
  const { source, destination } = postcopySides({ passes: 1 });
  const events: MigrationEvent[] = [];
  const report = await runMigration({ spec, plan: plan(5, { ramMode: 'postcopy' }, 'tcg'), source, destination, onEvent: (e) => events.push(e), pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.match(report.ram.postcopyWhy ?? '', /^post-copy mode, at once for a TCG guest \(QEMU 7\.2 under TCG loses writes to pages pre-copy already sent; .* sent, .* still to send\); B takes over the guest/);
  assert.ok(events.some((e) => e.type === 'escalation' && e.action === 'postcopy' && /at once for a TCG guest/.test(e.detail)));
});

// A guest resumed on stale memory crashes and reboots (docs/QEMU-TCG-PRECOPY.md, "Post-copy"): the report says so.
test('a guest that reset on B while post-copy ran is in the report and the CLI warns of it, not passed off as carried on', async () => {
  const resets = [{ reason: 'guest-reset', afterResumeMs: 1200 }];
  const { source, destination } = postcopySides({ resets });
  const report = await runMigration({ spec, plan: plan(60, { ramMode: 'postcopy' }), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.deepEqual(report.ram.postcopyResets, resets);
  assert.match(renderReport(report), /WARNING: the guest reset on B 1200 ms after it resumed there \(QEMU: guest-reset\): it did not carry on/);
});

test('the post-copy phase is stored before the continue that lets QEMU start it', async () => {
  const { calls, source, destination } = postcopySides();
  const stored: string[] = [];
  await runMigration({ spec, plan: plan(60, { ramMode: 'postcopy' }), source, destination, pollIntervalMs: 1, recordPhase: (p) => Promise.resolve(void stored.push(`${p}@${calls.length}`)) });
  assert.ok(stored.includes(`postcopy-started@${calls.indexOf('src.continueSwitchover')}`), `stored ${stored.join(', ')}`);
});

test('a link cut during post-copy that comes back: B listens anew, A resumes to it, and the migration completes', async () => {
  const { calls, source, destination } = postcopySides({ end: 'postcopy-paused', linkBack: true });
  const events: MigrationEvent[] = [];
  const report = await runMigration({ spec, plan: plan(60, { ramMode: 'postcopy' }), source, destination, onEvent: (e) => events.push(e), pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.deepEqual(calls.filter((c) => /Postcopy|retire/.test(c)), ['src.startPostcopy', 'src.pausePostcopy', 'dst.recoverPostcopy', 'src.resumePostcopy', 'src.retire']);
  const recovery = events.find((e) => e.type === 'escalation' && e.action === 'postcopy-recover');
  assert.ok(recovery?.type === 'escalation' && /^post-copy paused on A before all of the guest's RAM reached B: recovering post-copy \(attempt 1 of 3\)/.test(recovery.detail), JSON.stringify(recovery));
});

test('a link cut during post-copy that stays down: after 3 recoveries unresolved, the source neither resumed nor retired, the destination kept', async () => {
  const { calls, source, destination } = postcopySides({ end: 'postcopy-paused', fate: 'guest-ran' });
  const stored: string[] = [];
  const events: MigrationEvent[] = [];
  const report = await runMigration({ spec, plan: plan(60, { ramMode: 'postcopy' }), source, destination, onEvent: (e) => events.push(e), pollIntervalMs: 1, recordPhase: (p) => Promise.resolve(void stored.push(p)) });
  assert.equal(report.outcome, 'unresolved');
  assert.equal(events.filter((e) => e.type === 'escalation' && e.action === 'postcopy-recover').length, 3);
  assert.equal(report.error?.code, 'VMF_UNRESOLVED');
  assert.match(report.error?.message ?? '', /post-copy paused on A before all of the guest's RAM reached B; post-copy had begun, so web's memory is split between A and B and A never runs it again/);
  assert.ok(!calls.some((c) => ['src.rollback', 'src.retire', 'dst.rollback'].includes(c)), calls.join(', '));
  assert.equal(stored.at(-1), 'unresolved', 'stored, so that the controller keeps asking');
});

for (const step of ['src.continueSwitchover', 'dst.waitIncomingRunnable', 'dst.resume']) {
  test(`a failure in ${step} after post-copy was started never rolls the source back`, async () => {
    const { calls, source, destination } = postcopySides({ fail: step, fate: 'never-ran' });
    const report = await runMigration({ spec, plan: plan(60, { ramMode: 'postcopy' }), source, destination, pollIntervalMs: 1 });
    assert.equal(report.outcome, 'unresolved');
    assert.ok(!calls.some((c) => ['src.rollback', 'dst.rollback', 'src.retire'].includes(c)), calls.join(', '));
  });
}

test('a fault after post-copy delivered all of RAM to a destination never continued: it is continued, and the migration completes', async () => {
  const sides = postcopySides({ fail: 'dst.waitIncomingRunnable', fate: 'never-ran' });
  const info = sides.source.migrationInfo.bind(sides.source);
  sides.source.migrationInfo = async (signal) => ({ ...(await info(signal)), ...(sides.calls.includes('dst.waitIncomingRunnable') ? { status: 'completed' as const } : {}) });
  const report = await runMigration({ spec, plan: plan(60, { ramMode: 'postcopy' }), source: sides.source, destination: sides.destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.deepEqual(sides.calls.slice(sides.calls.indexOf('dst.waitIncomingRunnable')), ['dst.waitIncomingRunnable', 'dst.fate', 'dst.resume', 'src.completedInfo', 'src.retire']);
});

test('a cancel once post-copy began does not stop it: the guest ends on the destination', async () => {
  const { calls, source, destination } = postcopySides();
  const controller = new AbortController();
  const report = await runMigration({
    spec,
    plan: plan(60, { ramMode: 'postcopy' }),
    source,
    destination,
    signal: controller.signal,
    pollIntervalMs: 1,
    beforePhase: (phase) => void (phase === 'postcopy-started' && controller.abort()),
  });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.ok(!calls.includes('src.rollback'));
});

test('live mode never asks for post-copy, even for a guest whose first pass is done', async () => {
  const { calls, source, destination } = postcopySides();
  const report = await runMigration({ spec, plan: plan(0.3), source, destination, pollIntervalMs: 1 });
  assert.equal(report.error?.code, 'VMF_TIMEOUT', report.error?.message);
  assert.ok(!calls.includes('src.startPostcopy'));
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
});

test('stop-and-copy: the guest is stopped, its phase recorded first, once the disks are in sync and before RAM moves', async () => {
  const { calls, source, destination } = fakeSides();
  const recorded: MigrationPhase[] = [];
  let stoppedInPhase: MigrationPhase | undefined;
  const stop = source.stopGuest.bind(source);
  source.stopGuest = (signal) => {
    stoppedInPhase = recorded.at(-1);
    return stop(signal);
  };
  const report = await runMigration({ spec, plan: plan(60, { ramMode: 'stop-and-copy' }), source, destination, pollIntervalMs: 1, recordPhase: (p) => Promise.resolve(void recorded.push(p)) });
  assert.equal(report.outcome, 'completed');
  assert.equal(report.ramMode, 'stop-and-copy');
  assert.equal(stoppedInPhase, 'stopping', "the phase is stored before the stop is sent: a controller that restarts knows the guest may be stopped");
  assert.deepEqual(report.phases.map((p) => p.phase).slice(0, 5), ['preparing', 'mirroring', 'stopping', 'migrating', 'paused-at-switchover']);
  const order = ['src.mirrorStatus', 'src.stopGuest', 'src.startMigration'].map((c) => calls.lastIndexOf(c));
  assert.deepEqual([...order].sort((a, b) => a - b), order, `calls: ${calls.join(', ')}`);
  assert.equal(report.escalations, undefined, 'a stopped guest needs no escalation');
});

test('stop-and-copy that fails after the stop rolls back and the rollback resumes the guest (its pause reported)', async () => {
  const { calls, source, destination } = fakeSides({ fail: 'src.waitMilestone' });
  const report = await runMigration({ spec, plan: plan(60, { ramMode: 'stop-and-copy' }), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
  assert.equal(report.pauseMs, 120, "the guest was stopped: its pause is the rollback's STOP to RESUME, not 0");
});

test('--timeout-action abort: past --timeout into the RAM phase the migration rolls back with VMF_TIMEOUT', async () => {
  const { calls, source, destination } = fakeSides({ milestoneAfter: 'never' });
  const report = await runMigration({ spec, plan: plan(60, { timeoutS: 0.1, timeoutAction: 'abort' }), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'failed');
  assert.equal(report.error?.code, 'VMF_TIMEOUT');
  assert.match(report.error?.message ?? '', /the RAM phase ran 0.1 s \(--timeout\) without converging and --timeout-action is abort: rolled back, the guest runs on A/);
  assert.deepEqual(calls.slice(-2), ['dst.rollback', 'src.rollback']);
  assert.equal(report.escalations?.at(-1)?.action, 'abort');
});

test('--timeout counts from the start of the RAM phase, not the mirrors', async () => {
  const { source, destination } = fakeSides({ milestoneAfter: 'never' });
  const mirrorStatus = source.mirrorStatus.bind(source);
  // The mirrors alone take longer than --timeout.
  source.mirrorStatus = async (signal, waitMs) => {
    await new Promise((resolve) => setTimeout(resolve, 30));
    return mirrorStatus(signal, waitMs);
  };
  const started = Date.now();
  const report = await runMigration({ spec, plan: plan(60, { timeoutS: 0.05 }), source, destination, pollIntervalMs: 1 });
  const migrating = report.phases.find((p) => p.phase === 'migrating');
  assert.equal(report.error?.code, 'VMF_TIMEOUT');
  assert.ok(migrating && migrating.startedAt - started >= 50, 'the mirrors ran past --timeout without a rollback');
  assert.ok((report.escalations?.at(-1)?.atMs ?? 0) >= migrating.startedAt - started + 50, 'the action came --timeout after the RAM phase began');
});

test('--timeout-action pause: the guest is stopped mid-flight, its phase recorded, and the migration completes as stop-and-copy', async () => {
  const { calls, source, destination } = fakeSides({ milestoneAfter: 'src.stopGuest' });
  const report = await runMigration({ spec, plan: plan(60, { timeoutS: 0.05, timeoutAction: 'pause' }), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed');
  assert.ok(calls.indexOf('src.startMigration') < calls.indexOf('src.stopGuest'));
  const phases = report.phases.map((p) => p.phase);
  assert.deepEqual(phases.slice(phases.indexOf('migrating'), phases.indexOf('paused-at-switchover') + 1), ['migrating', 'stopping', 'migrating', 'paused-at-switchover']);
  assert.equal(report.escalations?.at(-1)?.action, 'pause');
  assert.match(report.escalations?.at(-1)?.detail ?? '', /stopping the guest so the rest of its RAM moves in one pass/);
});

test('a TCG guest in live mode starts pre-copy with a downtime limit of 0 (QEMU stops it after the first pass); KVM and --no-tcg-stop-copy keep the limit', async () => {
  const limits: Record<string, number> = {};
  for (const [name, migrationPlan] of [
    ['TCG', plan(5)],
    ['KVM', plan(5, {}, 'kvm')],
    ['--no-tcg-stop-copy', plan(5, { tcgStopCopy: false })],
  ] as const) {
    const { calls, source, destination } = fakeSides();
    const start = source.startMigration.bind(source);
    source.startMigration = (uri, settings, signal) => {
      limits[name] = settings.downtimeLimitMs;
      return start(uri, settings, signal);
    };
    const report = await runMigration({ spec, plan: migrationPlan, source, destination, pollIntervalMs: 1 });
    assert.equal(report.outcome, 'completed', `${name}: ${report.error?.message}`);
    assert.ok(!calls.includes('src.stopGuest'), `${name}: QEMU stops the guest itself, as at any switch-over`);
  }
  assert.deepEqual(limits, { TCG: 0, KVM: 75, '--no-tcg-stop-copy': 300 });
});

test('--timeout-action postcopy: at the timeout the migration switches to post-copy and completes there', async () => {
  const { calls, source, destination } = postcopySides();
  const report = await runMigration({ spec, plan: plan(60, { timeoutS: 0.05, timeoutAction: 'postcopy' }, 'kvm'), source, destination, pollIntervalMs: 1 });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.equal(calls.filter((c) => c === 'src.startPostcopy').length, 1);
  assert.ok(!calls.includes('src.stopGuest'));
  assert.equal(report.escalations?.at(-1)?.action, 'postcopy');
  assert.match(report.ram.postcopyWhy ?? '', /the RAM phase ran 0\.05 s \(--timeout\): switching to post-copy/);
  assert.ok(report.phases.some((p) => p.phase === 'postcopy-active'), 'the destination ran the guest in post-copy');
});

test('escalation order: downtime steps, then auto-converge, then the timeout action, each in the event stream and the report', async () => {
  const { calls, source, destination } = fakeSides({ milestoneAfter: 'never' });
  const events: MigrationEvent[] = [];
  // A KVM guest gets the whole downtime ladder (a TCG guest starts at its top).
  const report = await runMigration({ spec, plan: plan(60, { timeoutS: 0.3, timeoutAction: 'abort' }, 'kvm'), source, destination, pollIntervalMs: 1, onEvent: (e) => events.push(e) });
  const emitted = events.flatMap((e) => (e.type === 'escalation' ? [e.action] : []));
  assert.deepEqual(emitted, ['downtime-limit', 'downtime-limit', 'auto-converge', 'abort']);
  assert.deepEqual(report.escalations?.map((e) => e.action), emitted);
  assert.deepEqual(report.escalations?.map((e) => e.detail.split(':')[0]), ['not converging', 'not converging', 'not converging at the largest downtime limit', 'the RAM phase ran 0.3 s (--timeout)']);
  const times = report.escalations?.map((e) => e.atMs) ?? [];
  assert.deepEqual([...times].sort((a, b) => a - b), times);
  assert.deepEqual(calls.filter((c) => c === 'src.setDowntimeLimit' || c === 'src.releaseThrottle'), ['src.setDowntimeLimit', 'src.setDowntimeLimit', 'src.releaseThrottle']);
});

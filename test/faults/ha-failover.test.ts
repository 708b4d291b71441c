// Two controllers on one throwaway PostgreSQL, two hosts in network namespaces,
// one guest writing to a local and a shared disk: the leader dies (SIGKILL) or
// stalls (SIGSTOP past its lease) in the middle of a migration's mirror. The
// standby takes over within a few seconds, settles the migration by the rules
// of a restarted controller (before any resume was sent: rolled back), the
// guest runs on exactly one host with every acknowledged record intact, and a
// stalled leader that wakes up can make no agent act: its epoch is refused.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { AgentClient } from '../../src/agent/client.ts';
import { ControllerClient } from '../../src/controller/client.ts';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import { hasCode } from '../../src/errors.ts';
import type { MigrationRecord } from '../../src/store/store.ts';
import { FaultCluster } from '../support/fault-cluster.ts';
import { startPostgres, type TestPostgres } from '../support/postgres.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';

const leaseTtlS = 2;
/** A standby notices an expired lease at its next attempt, every third of the TTL: a takeover within TTL + one attempt, with room for a loaded machine. */
const takeoverBoundMs = leaseTtlS * 1000 * 3;
let postgres: TestPostgres;
let cluster: LocalCluster;
let faults: FaultCluster;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  assert.equal(process.getuid?.(), 0, 'the fault tests build network namespaces and need root (CI runs as root)');
  work = await makeTempDir('ha');
  postgres = await startPostgres();
  // Both first controllers die where the leader stores `paused-at-switchover` (the switch-over case below); no migration before it gets that far.
  process.env.VMFERRY_FAULT_POINTS = 'controller-at-switchover';
  try {
    cluster = await LocalCluster.start({
      workDir: join(work.path, 'cluster'),
      hostIds: ['A', 'B'],
      logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
      accel: 'tcg',
      namespaces: true,
      network: { prefix: 'vmfh', subnet: '10.213.47', hostLinkSubnet: '10.213.48' },
      controllerProcess: true,
      controllers: 2,
      db: postgres.url,
      leaseTtlS,
    });
  } finally {
    delete process.env.VMFERRY_FAULT_POINTS;
  }
  faults = new FaultCluster(cluster, work.path);
});
after(async () => {
  await cluster?.stop();
  await postgres?.stop();
  await work?.remove();
});

/** Waits until controller `index` leads; returns how long that took and its epoch. */
async function untilLeads(index: number, since: number): Promise<{ ms: number; epoch: number }> {
  for (;;) {
    const status = await cluster.leadership(index).catch(() => undefined);
    if (status?.leader && status.epoch !== null) return { ms: performance.now() - since, epoch: status.epoch };
    assert.ok(performance.now() - since < 30_000, `controller ${index} did not take over within 30 s`);
    await sleep(50);
  }
}

/** The migration's record once final, read from controller `index` only (the other may be paused: it would not answer). */
async function finalRecordFrom(index: number, id: string): Promise<MigrationRecord> {
  const api = new ControllerClient(cluster.controllerUrls[index] ?? '');
  const deadline = Date.now() + 180_000;
  for (;;) {
    const record = await api.migration(id);
    if (['completed', 'failed', 'cancelled'].includes(record.phase)) return record;
    assert.ok(Date.now() < deadline, `migration ${id} is still ${record.phase}`);
    await sleep(100);
  }
}

/** Starts a migration of `vm` to B whose capped mirror lasts seconds, and waits until it mirrors. */
async function migrateIntoMirror(vm: string): Promise<string> {
  const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
  await faults.waitForPhase(id as string, ['mirroring'], 60_000);
  return id as string;
}

// One guest for both faults (its QEMU time is the cost of this file): after the first it runs on A only, as a fresh one would.
const vm = 'ha';

test('the leader killed (SIGKILL), then a leader paused (SIGSTOP) past its lease, each during a migration\'s mirror: the standby takes over within seconds and rolls it back; the woken leader\'s epoch is refused; the guest runs on A only, and its next migration completes, intact', async () => {
  assert.equal((await cluster.leadership(0)).leader, true, 'the first controller started leads');
  // New data on the local disk keeps the (capped) mirror busy for seconds, long enough to fault the leader inside it.
  await faults.startVm(vm, { intervalMs: 0, bulkMiBs: 4 }, 256);

  // 1. The leader dies.
  const killed = await migrateIntoMirror(vm);
  const killedAt = performance.now();
  await cluster.killController(0);
  const firstTakeover = await untilLeads(1, killedAt);
  assert.ok(firstTakeover.ms < takeoverBoundMs, `the standby took over ${Math.round(firstTakeover.ms)} ms after the kill (bound ${takeoverBoundMs} ms)`);
  const rolledBack = await finalRecordFrom(1, killed);
  assert.equal(rolledBack.phase, 'failed');
  assert.match(rolledBack.report?.recovery ?? '', /new leader .* while the migration was mirroring; rolled back: ha runs on A/);
  await faults.assertRunsOnlyOn(vm, 'A');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controllers (PostgreSQL)',
    tried: 'the leading controller killed (SIGKILL) while a migration mirrored; a standby on the same PostgreSQL',
    observed: `the standby led ${(firstTakeover.ms / 1000).toFixed(1)} s after the kill (lease TTL ${leaseTtlS} s) and rolled the migration back: "${rolledBack.report?.recovery}"; VM on A only, guest kept writing (its records verified after the next fault)`,
    ok: true,
  });

  // 2. The killed one comes back as a standby; controller 1 leads, and stalls.
  await cluster.startController(0);
  assert.equal((await cluster.leadership(0)).leader, false);
  const id = await migrateIntoMirror(vm);
  const paused = await cluster.leadership(1);
  assert.ok(paused.leader && paused.epoch !== null, 'controller 1 leads');
  const pausedAt = performance.now();
  cluster.signalController(1, 'SIGSTOP');
  let record: MigrationRecord;
  let takeover: { ms: number; epoch: number };
  try {
    takeover = await untilLeads(0, pausedAt);
    assert.ok(takeover.epoch > paused.epoch, 'the new tenure has a higher epoch');
    record = await finalRecordFrom(0, id);
  } finally {
    cluster.signalController(1, 'SIGCONT');
  }
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.recovery ?? '', /rolled back: ha runs on A/);

  // The woken leader's executor still holds the migration: give it time to try, then check it changed nothing.
  await sleep(leaseTtlS * 1000 * 2);
  assert.equal((await cluster.leadership(1)).leader, false, 'the woken controller knows it is a standby');
  const after = await new ControllerClient(cluster.controllerUrls[0] ?? '').migration(id);
  assert.deepEqual([after.phase, after.updatedAt], [record.phase, record.updatedAt], 'the woken controller wrote nothing to the migration');
  // What it would send a host, stamped with its old epoch, is refused there: the VM is not stopped.
  const stale = new AgentClient(cluster.host('A').agentUrl, undefined, 'A', { acting: () => paused.epoch ?? 0, reading: () => paused.epoch ?? 0 });
  await assert.rejects(stale.stopVm(vm, true), (err) => hasCode(err, 'VMF_STALE_LEADER') && /carries leader epoch \d+, and this agent has seen epoch \d+/.test(err.message));
  await faults.assertRunsOnlyOn(vm, 'A');
  // The rolled-back migrations left nothing on A's QEMU that the next one trips over (a mirror target a
  // request of the paused leader's added after the rollback looked failed it with "Duplicate nodes").
  const next = await cluster.api.migrate({ vm, to: 'B' });
  const nextRecord = await finalRecordFrom(0, next.id as string);
  assert.equal(nextRecord.phase, 'completed', nextRecord.report?.error?.message);
  const outcome = await faults.assertSettled(vm, 'B');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controllers (PostgreSQL)',
    tried: `the leading controller paused (SIGSTOP) past its ${leaseTtlS} s lease while a migration mirrored, continued once the standby had settled it`,
    observed:
      `the standby led ${(takeover.ms / 1000).toFixed(1)} s after the pause with epoch ${takeover.epoch} (was ${paused.epoch}) and rolled the migration back; ` +
      `the woken controller called itself standby and wrote nothing; a request with its epoch was refused by A's agent (VMF_STALE_LEADER), the VM kept running on A; its next migration completed; ${outcome}`,
    ok: true,
  });
});

/** Restarts controller `index` with the fault points `points` armed (none: an ordinary restart); it comes back as a standby. */
async function restartController(index: number, points = ''): Promise<void> {
  if (points) process.env.VMFERRY_FAULT_POINTS = points;
  try {
    await cluster.startController(index);
  } finally {
    delete process.env.VMFERRY_FAULT_POINTS;
  }
  assert.equal((await cluster.leadership(index)).leader, false, `the restarted controller ${index} is a standby`);
}

/** Waits until controller `index` no longer answers (killed at its fault point); returns when that was noticed. */
async function untilDead(index: number, timeoutMs: number): Promise<number> {
  const deadline = performance.now() + timeoutMs;
  while (await cluster.leadership(index).then(() => true, () => false)) {
    assert.ok(performance.now() < deadline, `controller ${index} did not reach its fault point within ${timeoutMs / 1000} s`);
    await sleep(50);
  }
  return performance.now();
}

// The faults after the mirror: a second guest, as the first ends its test deleted. The tests run in order, each starting
// where the last left the guest and the controllers; its records are verified after the last.
const lateVm = 'ha-late';

test('the leader killed (SIGKILL) while the RAM moves: the standby takes over and rolls the migration back; the guest runs on A only', async () => {
  assert.equal((await cluster.leadership(0)).leader, true, 'controller 0 leads since the pause of controller 1');
  await faults.startVm(lateVm, { intervalMs: 0, bulkMiBs: 4 }, 256);
  const { id } = await cluster.api.migrate({ vm: lateVm, to: 'B', bandwidthMiBs: 2 });
  await faults.waitForPhase(id as string, ['migrating'], 90_000);
  const killedAt = performance.now();
  await cluster.killController(0);
  const takeover = await untilLeads(1, killedAt);
  assert.ok(takeover.ms < takeoverBoundMs, `the standby took over ${Math.round(takeover.ms)} ms after the kill (bound ${takeoverBoundMs} ms)`);
  const record = await finalRecordFrom(1, id as string);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.recovery ?? '', /new leader .* while the migration was migrating; rolled back: ha-late runs on A/);
  await faults.assertRunsOnlyOn(lateVm, 'A');
  // Back as a standby, armed for the resume case after the next one.
  await restartController(0, 'controller-after-resume');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controllers (PostgreSQL)',
    tried: 'the leading controller killed (SIGKILL) during the RAM phase (pre-copy, capped at 2 MiB/s); a standby on the same PostgreSQL',
    observed: `the standby led ${(takeover.ms / 1000).toFixed(1)} s after the kill and rolled the migration back: "${record.report?.recovery}"; VM on A only, guest kept writing (records verified after the last fault)`,
    ok: true,
  });
});

test('the leader killed (SIGKILL) at the switch-over, the source paused before it: the standby takes over and rolls back; the guest runs on A only', async () => {
  assert.equal((await cluster.leadership(1)).leader, true, 'controller 1 leads, armed since its start to die once it stored paused-at-switchover');
  // Uncapped: a long TCG pre-copy would be refused at switch-over (docs/QEMU-TCG-PRECOPY.md).
  const { id } = await cluster.api.migrate({ vm: lateVm, to: 'B' });
  const diedAt = await untilDead(1, 120_000);
  const takeover = await untilLeads(0, diedAt);
  assert.ok(takeover.ms < takeoverBoundMs, `the standby took over ${Math.round(takeover.ms)} ms after the death (bound ${takeoverBoundMs} ms)`);
  const record = await finalRecordFrom(0, id as string);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.recovery ?? '', /new leader .* while the migration was paused-at-switchover; rolled back: ha-late runs on A/);
  await faults.assertRunsOnlyOn(lateVm, 'A');
  await restartController(1);
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controllers (PostgreSQL)',
    tried: 'the leading controller killed (SIGKILL, a fault point) right after it stored paused-at-switchover: the source paused before the switch-over, nothing resumed',
    observed: `the standby led ${(takeover.ms / 1000).toFixed(1)} s after the death and rolled the migration back (B's incoming QEMU first, then A's guest continued): "${record.report?.recovery}"; VM on A only, guest kept writing (records verified after the last fault)`,
    ok: true,
  });
});

test('the leader killed (SIGKILL) once the destination resumed, before the source retired: the standby takes over and finishes on B; the guest runs on B only', async () => {
  assert.equal((await cluster.leadership(0)).leader, true, 'controller 0 leads, armed to die once it stored resumed');
  const { id } = await cluster.api.migrate({ vm: lateVm, to: 'B' });
  const diedAt = await untilDead(0, 120_000);
  const takeover = await untilLeads(1, diedAt);
  assert.ok(takeover.ms < takeoverBoundMs, `the standby took over ${Math.round(takeover.ms)} ms after the death (bound ${takeoverBoundMs} ms)`);
  const record = await finalRecordFrom(1, id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  assert.match(record.report?.recovery ?? '', /new leader .* while the migration was resumed; B confirmed the guest ran there, so the source was retired/);
  await faults.assertRunsOnlyOn(lateVm, 'B');
  await restartController(0);
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controllers (PostgreSQL)',
    tried: 'the leading controller killed (SIGKILL, a fault point) right after it stored resumed: the guest runs on B, A paused and not retired',
    observed: `the standby led ${(takeover.ms / 1000).toFixed(1)} s after the death, B confirmed the guest ran there, A was retired: "${record.report?.recovery}"; VM on B only, guest kept writing (records verified after the last fault)`,
    ok: true,
  });
});

test('PostgreSQL restarted (crash, same data and port) under a running migration: the migration completes or rolls back, a controller leads again, nothing wedges; every record intact', async () => {
  const before = await cluster.leadership(1);
  assert.ok(before.leader && before.epoch !== null, 'controller 1 leads');
  // Uncapped: over in seconds, and the restart lands in it.
  const { id } = await cluster.api.migrate({ vm: lateVm, to: 'A' });
  await faults.waitForPhase(id as string, ['preparing', 'mirroring', 'stopping', 'migrating', 'paused-at-switchover', 'resume-sent', 'resumed', 'source-retired'], 60_000);
  const restartedAt = performance.now();
  await postgres.restart();
  const restartMs = performance.now() - restartedAt;
  // Whichever controller holds the lease after the restart settles the migration; the API answers from either.
  const leads = async (): Promise<{ index: number; epoch: number } | undefined> => {
    for (const index of [0, 1]) {
      const status = await cluster.leadership(index).catch(() => undefined);
      if (status?.leader && status.epoch !== null) return { index, epoch: status.epoch };
    }
    return undefined;
  };
  let leader = await leads();
  for (const deadline = performance.now() + 30_000; !leader; leader = await leads()) {
    assert.ok(performance.now() < deadline, 'no controller leads 30 s after PostgreSQL came back');
    await sleep(100);
  }
  const record = await finalRecordFrom(leader.index, id as string);
  assert.ok(['completed', 'failed'].includes(record.phase), `the migration ended completed or failed, not ${record.phase}`);
  const host = record.phase === 'completed' ? 'A' : 'B';
  // The guest's records, and the API the leader serves (stop, delete): nothing wedged.
  const outcome = await faults.assertSettled(lateVm, host);
  const after = await leads();
  assert.ok(after, 'a controller leads after the restart');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controllers (PostgreSQL)',
    tried: `PostgreSQL crashed and started again (pg_ctl stop -m immediate, start; same data dir and port; ${(restartMs / 1000).toFixed(1)} s) while a migration B → A ran, lease TTL ${leaseTtlS} s`,
    observed:
      `migration ${record.phase}${record.report?.recovery ? ` ("${record.report.recovery}")` : ''}; controller ${after.index} leads with epoch ${after.epoch} (epoch ${before.epoch} before the restart); ` +
      `${outcome}`,
    ok: true,
  });
});

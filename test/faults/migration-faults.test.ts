// Failures in the middle of a migration, end to end: two hosts in their own
// network namespaces (a bridge to the controller and the storage server, and a
// direct veth pair between the hosts that carries the migration), the test
// guest writing to a local and a shared disk throughout. After each fault the
// VM runs on exactly one host, every acknowledged record is intact, nothing
// is left behind on the other host, and the migration record says why.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { AgentClient } from '../../src/agent/client.ts';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import { readGuestReport, waitForAcks } from '../../src/guest/test-guest.ts';
import { runProgram } from '../../src/util/run.ts';
import { FaultCluster } from '../support/fault-cluster.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';

let cluster: LocalCluster;
const abandonAfterS = 15;
let faults: FaultCluster;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  assert.equal(process.getuid?.(), 0, 'the fault tests build network namespaces and need root (CI runs as root)');
  work = await makeTempDir('faults');
  cluster = await LocalCluster.start({
    workDir: join(work.path, 'cluster'),
    hostIds: ['A', 'B'],
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    // No KVM probe at each agent start (3 s where KVM hangs): test/qemu/accel.test.ts covers --accel auto.
    accel: 'tcg',
    namespaces: true,
    network: { prefix: 'vmff', subnet: '10.213.17', hostLinkSubnet: '10.213.18' },
    // Its own process, so a test can kill it as a crash would.
    controllerProcess: true,
    // Longer than any restart the controller tests below make, short enough to wait for in one.
    abandonAfterS: abandonAfterS,
  });
  faults = new FaultCluster(cluster, work.path);
});
after(async () => {
  await cluster?.stop();
  await work?.remove();
});

/** Kills the QEMU of `vm` on `host` with SIGKILL. */
async function killQemu(vm: string, host: string): Promise<void> {
  const [pid] = (await faults.qemuPids(vm)).get(host) ?? [];
  assert.ok(pid, `a QEMU of ${vm} runs on ${host}`);
  process.kill(pid, 'SIGKILL');
}

// One guest for both phases: after the first kill it runs on A only, as a fresh one would, and the second migration starts clean.
test('destination QEMU killed while mirroring, then while migrating: each migration fails and the VM keeps running on the source', async () => {
  const vm = 'kill-qemu';
  await faults.startVm(vm);
  for (const phase of ['mirroring', 'migrating'] as const) {
    const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
    await faults.waitForPhase(id as string, [phase], 60_000);
    await sleep(500);
    await killQemu(vm, 'B');
    const record = await faults.finalRecord(id as string);
    assert.equal(record.phase, 'failed');
    assert.ok(record.report?.error?.message, 'the record says why');
    // Verify mode stops the VM: it runs once, after the second fault, and covers the records of both.
    let outcome = 'VM on A only, guest kept writing, nothing left on B (its records verified after the next fault)';
    if (phase === 'migrating') outcome = await faults.assertSettled(vm, 'A');
    else await faults.assertRunsOnlyOn(vm, 'A');
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'migration',
      tried: `destination QEMU killed (SIGKILL) while ${phase}`,
      observed: `failed: "${record.report?.error?.message.slice(0, 140)}"; ${outcome}`,
      ok: true,
    });
  }
});

test('destination agent killed mid-migration: the VM stays on the source; the restarted agent kills the orphan and quarantines its target', async () => {
  const vm = 'kill-agent';
  // Nothing asks B anything until the switch-over, so all of RAM moves first: at 8 MiB/s that takes seconds, not half a
  // minute as at 2. New data on the local disk (4 MiB/s) keeps the mirror copying for seconds at that cap, to kill inside it.
  await faults.startVm(vm, { intervalMs: 0, bulkMiBs: 4 }, 256);
  const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 8 });
  await faults.waitForPhase(id as string, ['mirroring'], 60_000);
  await cluster.killAgent('B');
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.error?.message ?? '', /B|unreachable|reach/i);
  await cluster.startAgent('B');
  await cluster.waitForHosts(['A', 'B'], 30_000);
  // Nothing on B says the target is only a copy, so it is moved aside, not deleted; the operator purges it.
  const [entry, ...more] = await cluster.api.quarantine('B');
  assert.ok(entry, "B's quarantine holds the interrupted target");
  assert.equal(more.length, 0);
  assert.deepEqual(entry.items.filter((item) => item.kind === 'pool-image').map((item) => item.from), [join(cluster.host('B').dataDir, 'pool', `${vm}-root.qcow2`)]);
  await cluster.api.purgeQuarantined('B', entry.id);
  const outcome = await faults.assertSettled(vm, 'A');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'migration',
    tried: 'destination agent killed (SIGKILL) during the mirror, then restarted',
    observed: `failed: "${record.report?.error?.message.slice(0, 140)}"; the restarted agent killed the orphan incoming QEMU and moved its target volume to the quarantine (purged); ${outcome}`,
    ok: true,
  });
});

for (const phase of ['mirroring', 'migrating'] as const) {
  test(`controller killed while ${phase} and restarted: it finds the migration unfinished, rolls it back, the VM runs on the source`, async () => {
    const vm = `ctl-${phase.slice(0, 3)}`;
    // New data on the local disk keeps the (capped) mirror busy for seconds, long enough to kill the controller inside it.
    await faults.startVm(vm, { intervalMs: 0, bulkMiBs: 4 }, 256);
    const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
    await faults.waitForPhase(id as string, [phase], 60_000);
    await cluster.killController();
    // Nothing drives the migration meanwhile; QEMU's own pre-copy carries on.
    await sleep(3_000);
    await cluster.startController();
    const record = await faults.finalRecord(id as string);
    assert.equal(record.phase, 'failed');
    assert.match(record.report?.recovery ?? '', new RegExp(`the controller restarted while the migration was ${phase}; rolled back: ${vm} runs on A`));
    const outcome = await faults.assertSettled(vm, 'A');
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'controller',
      tried: `controller killed (SIGKILL) while ${phase}, restarted 3 s later`,
      observed: `the restarted controller asked the agents and rolled back: "${record.report?.recovery}"; ${outcome}`,
      ok: true,
    });
  });
}

test('controller killed for good while the RAM moves: the agents settle alone, the guest keeps running on the source', async () => {
  const vm = 'ctl-gone';
  await faults.startVm(vm, { intervalMs: 0, bulkMiBs: 4 }, 256);
  const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
  await faults.waitForPhase(id as string, ['migrating'], 60_000);
  await cluster.killController();
  const killedAt = Date.now();
  // No controller from here on: A's agent must notice the silence, roll its half back, and B's must clear up after its QEMU exits.
  const sourceAgent = new AgentClient(cluster.host('A').agentUrl);
  const destinationAgent = new AgentClient(cluster.host('B').agentUrl);
  const deadline = killedAt + (abandonAfterS + 30) * 1000;
  for (;;) {
    const [halvesA, halvesB, pids] = await Promise.all([sourceAgent.migrationHalves(id as string), destinationAgent.migrationHalves(id as string), faults.qemuPids(vm)]);
    if (!halvesA.source && !halvesB.destination && pids.get('B')?.length === 0) break;
    assert.ok(Date.now() < deadline, `the agents did not settle migration ${id} alone: A ${JSON.stringify(halvesA)}, B ${JSON.stringify(halvesB)}, QEMUs ${JSON.stringify([...pids])}`);
    await sleep(500);
  }
  const settledAfterS = (Date.now() - killedAt) / 1000;
  assert.ok(settledAfterS >= abandonAfterS - 1, `settled after ${settledAfterS} s: not before the silence lasted ${abandonAfterS} s`);
  const onA = await sourceAgent.getVm(vm);
  assert.equal(onA.state, 'running', 'the guest runs on A, without anyone asking');
  const acks = (await readGuestReport(faults.reportLogs(vm))).acks;
  await waitForAcks(faults.reportLogs(vm), ['root', 'data'], { atLeast: 5, since: acks, timeoutMs: 60_000 });

  // The controller's recovery, when it comes back, finds nothing left to do but record it.
  await cluster.startController();
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.recovery ?? '', new RegExp(`rolled back: ${vm} runs on A`));
  const outcome = await faults.assertSettled(vm, 'A');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controller',
    tried: `controller killed (SIGKILL) during the RAM phase and not restarted for ${abandonAfterS}+ s (agents with --abandon-after ${abandonAfterS})`,
    observed: `A's agent rolled its half back after ${settledAfterS.toFixed(0)} s of silence, B's removed its exited QEMU's half; the guest kept running on A; the restarted controller recorded "${record.report?.recovery}"; ${outcome}`,
    ok: true,
  });
});

test('controller killed just after the destination resumed: the restarted controller finishes the migration', async () => {
  const vm = 'ctl-resumed';
  await faults.startVm(vm);
  const destinationAgent = new AgentClient(cluster.host('B').agentUrl);
  // Uncapped: a long TCG pre-copy would be refused at switch-over (docs/QEMU-TCG-PRECOPY.md).
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  const deadline = Date.now() + 120_000;
  while (!(await destinationAgent.getVm(vm).then((info) => info.state === 'running', () => false))) {
    assert.ok(Date.now() < deadline, 'the guest never came up on B');
    await sleep(5);
  }
  await cluster.killController();
  await cluster.startController();
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  // The kill lands between the resume and the source's retirement nearly always; if the old controller got there first, it finished on its own.
  const path = record.report?.recovery ? 'finished by the restarted controller' : 'completed before the kill landed';
  if (record.report?.recovery) assert.match(record.report.recovery, /B confirmed the guest ran there, so the source was retired/);
  const outcome = await faults.assertSettled(vm, 'B');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controller',
    tried: 'controller killed (SIGKILL) right after the destination resumed, before the source retired',
    observed: `completed, ${path}: "${record.report?.recovery ?? ''}"; ${outcome}`,
    ok: true,
  });
});

/** Runs a command in the mount namespace of host `id`'s agent (`ip netns exec` gives each its own). */
function inAgentMounts(id: string, command: string[]): Promise<string> {
  return runProgram('nsenter', ['-t', String(cluster.host(id).process.pid), '-m', ...command]);
}

test('destination pool full during the mirror: the migration fails, the guest on the source never sees an error', async () => {
  const vm = 'pool-full';
  // The guest keeps writing new data to its local disk (bulk, 4 MiB/s), so the mirror's target keeps growing.
  await faults.startVm(vm, { intervalMs: 0, bulkMiBs: 4 }, 256);
  const pool = join(cluster.host('B').dataDir, 'pool');
  // Room for what the disk holds now (the plan checks that), not for what the guest writes during the mirror.
  await inAgentMounts('B', ['mount', '-t', 'tmpfs', '-o', 'size=96m', 'vmferry-pool-full', pool]);
  try {
    const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
    const record = await faults.finalRecord(id as string);
    assert.equal(record.phase, 'failed');
    assert.match(record.report?.error?.message ?? '', /no space left on device/i);
    assert.equal((await inAgentMounts('B', ['ls', '-A', pool])).trim(), '', "nothing left in B's (full) pool");
    const guestLog = await readFile(faults.reportLogs(vm)[0] as string, 'utf8');
    assert.doesNotMatch(guestLog, /GUEST-ERROR/, 'the guest never saw a write error');
    const outcome = await faults.assertSettled(vm, 'A');
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'migration',
      tried: "destination pool (a 96 MiB tmpfs) filled up during the mirror while the guest kept writing new data",
      observed: `failed: "${record.report?.error?.message.slice(0, 140)}"; no guest I/O error; ${outcome}`,
      ok: true,
    });
  } finally {
    // Lazily: after a failure a QEMU may still hold the mount, and the failure is the news.
    await inAgentMounts('B', ['umount', '--lazy', pool]);
  }
});

// A cut link between the hosts: test/faults/link-cut.test.ts.

test('the storage server restarted under a running VM and during a migration: QEMU reconnects, the migration completes', async () => {
  const vm = 'storage-restart';
  await faults.startVm(vm);
  await cluster.restartStorage(2_000);
  const guestLog = await readFile(faults.reportLogs(vm)[0] as string, 'utf8');
  assert.doesNotMatch(guestLog, /GUEST-ERROR/);
  const acks = (await readGuestReport(faults.reportLogs(vm))).acks;
  await waitForAcks(faults.reportLogs(vm), ['root', 'data'], { atLeast: 10, since: acks, timeoutMs: 60_000 });

  // No bandwidth cap: see the note on long pre-copy runs in docs/RELIABILITY.md.
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  await faults.waitForPhase(id as string, ['preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'completed'], 60_000);
  await cluster.restartStorage(1_000);
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  assert.doesNotMatch(await readFile(faults.reportLogs(vm)[1] as string, 'utf8'), /GUEST-ERROR/);
  const outcome = await faults.assertSettled(vm, 'B');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'storage server stopped for 2 s under a running VM, then for 1 s during its migration',
    observed: `no guest I/O error (QEMU's NBD client reconnected within reconnect-delay); migration completed; ${outcome}`,
    ok: true,
  });
});

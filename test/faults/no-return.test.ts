// Faults between an action and its reply at the switch-over, end to end (issue 13, problem 1): an
// agent dies right after its QEMU acted (a named fault point, VMFERRY_FAULT_POINTS), so the
// controller never hears back. The guest must run on exactly one host throughout, stay paused
// where it must not run while nobody can tell, and end on the right host with every acknowledged
// record intact once the agent is back.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { AgentClient } from '../../src/agent/client.ts';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import { readGuestReport } from '../../src/guest/test-guest.ts';
import { pollUntil } from '../../src/util/poll.ts';
import { FaultCluster } from '../support/fault-cluster.ts';
import { runVmferry } from '../support/cli.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';

let cluster: LocalCluster;
let faults: FaultCluster;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  assert.equal(process.getuid?.(), 0, 'the fault tests build network namespaces and need root (CI runs as root)');
  work = await makeTempDir('no-return');
  cluster = await LocalCluster.start({
    workDir: join(work.path, 'cluster'),
    hostIds: ['A', 'B'],
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    // No KVM probe at each agent start (3 s where KVM hangs): test/qemu/accel.test.ts covers --accel auto.
    accel: 'tcg',
    namespaces: true,
    network: { prefix: 'vmfn', subnet: '10.213.27', hostLinkSubnet: '10.213.28' },
  });
  faults = new FaultCluster(cluster, work.path);
});
after(async () => {
  await cluster?.stop();
  await work?.remove();
});

/** Restarts host `id`'s agent with a fault point armed: it kills itself there, once. */
async function armFaultPoint(id: string, point: string): Promise<void> {
  process.env.VMFERRY_FAULT_POINTS = point;
  try {
    await cluster.restartAgent(id);
  } finally {
    delete process.env.VMFERRY_FAULT_POINTS;
  }
}

async function waitAgentDead(id: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (cluster.host(id).process.exitCode === null && cluster.host(id).process.signalCode === null) {
    assert.ok(Date.now() < deadline, `the agent of ${id} did not reach its fault point within ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Records the guest acknowledged on `host` (its report channel there). */
async function acksOn(vm: string, host: string): Promise<number> {
  const report = await readGuestReport([join(cluster.host(host).dataDir, 'vms', vm, 'serial1.log')]);
  return [...report.acks.values()].reduce((a, b) => a + b, 0);
}

/** The guest writes on `running` and not on `paused`, over a few seconds. */
async function assertWritesOnlyOn(vm: string, running: string, paused: string): Promise<void> {
  const before = { running: await acksOn(vm, running), paused: await acksOn(vm, paused) };
  await sleep(3_000);
  assert.ok((await acksOn(vm, running)) > before.running, `the guest keeps acknowledging writes on ${running}`);
  assert.equal(await acksOn(vm, paused), before.paused, `the guest does not run on ${paused} too`);
}

test("destination agent killed right after its QEMU's cont: unresolved while it is down, the source stays paused; back, it completes on B", async () => {
  const vm = 'cont-lost';
  await faults.startVm(vm);
  await armFaultPoint('B', 'destination-after-cont');
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  await waitAgentDead('B', 180_000);
  const unresolved = await faults.waitForPhase(id as string, ['unresolved'], 120_000);
  assert.match(unresolved.report?.error?.message ?? '', /B could not say whether the guest ran there/);
  assert.equal((await new AgentClient(cluster.host('A').agentUrl).getVm(vm)).state, 'paused', 'the source is kept paused');
  // B's QEMU outlived its agent and runs the guest: it must be the only one.
  await assertWritesOnlyOn(vm, 'B', 'A');
  const listed = (await cluster.api.vms()).find((v) => v.name === vm && v.host === 'A');
  assert.equal(listed?.migration?.phase, 'unresolved', 'vm list shows the unresolved migration');

  await cluster.startAgent('B');
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  assert.match(record.report?.recovery ?? '', /B confirmed the guest ran there, so the source was retired/);
  const outcome = await faults.assertSettled(vm, 'B');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'agent',
    tried: "destination agent killed (SIGKILL) right after its QEMU's cont, before it adopted the guest or replied",
    observed: `unresolved while B's agent was down (A paused, the guest ran on B only); B's restarted agent took its QEMU over from incoming.json and the controller completed the migration; ${outcome}`,
    ok: true,
  });
});

test('source agent killed right after migrate-continue: B is rolled back, the source waits paused; back, its agent resumes the guest on A', async () => {
  const vm = 'continue-lost';
  await faults.startVm(vm);
  await armFaultPoint('A', 'source-after-continue');
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  await waitAgentDead('A', 180_000);
  const unresolved = await faults.waitForPhase(id as string, ['unresolved'], 120_000);
  assert.match(unresolved.report?.error?.message ?? '', /the rollback of A could not reach its agent/);
  assert.deepEqual((await faults.qemuPids(vm)).get('B'), [], "B's QEMU was killed before anything else");

  await cluster.startAgent('A');
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.recovery ?? '', /rolled back: continue-lost runs on A/);
  const outcome = await faults.assertSettled(vm, 'A');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'agent',
    tried: 'source agent killed (SIGKILL) right after migrate-continue, before it replied',
    observed: `B rolled back first; unresolved while A's agent was down (its guest paused); A's restarted agent took its half back from outgoing.json and the controller resumed the guest there; ${outcome}`,
    ok: true,
  });
});

test("destination agent killed between its lease claim and cont: back, its QEMU that never ran is removed and its lease released; the source takes the shared disk back and writes on", async () => {
  const vm = 'claim-lost';
  await faults.startVm(vm);
  await armFaultPoint('B', 'destination-after-claim');
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  await waitAgentDead('B', 180_000);
  await faults.waitForPhase(id as string, ['unresolved'], 120_000);
  assert.equal((await new AgentClient(cluster.host('A').agentUrl).getVm(vm)).state, 'paused', 'the source is kept paused while B cannot say');

  await cluster.startAgent('B');
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.recovery ?? '', /rolled back: claim-lost runs on A/);
  // assertSettled waits for new acknowledged records on both disks: the shared one would get EPERM without the lease.
  const outcome = await faults.assertSettled(vm, 'A');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'agent',
    tried: "destination agent killed (SIGKILL) after it claimed the shared volume's writer lease and before its QEMU's cont",
    observed: `unresolved while B's agent was down; B's restarted agent found its QEMU had never run the guest, killed it and released its lease; A claimed the lease back before it resumed, so the guest kept writing its shared disk; ${outcome}`,
    ok: true,
  });
});

/**
 * A power loss of B right after the cont: its QEMU and agent both killed before the agent recorded that the guest
 * ran. Back, B cannot tell whether the guest ran there; nothing is settled by itself and A stays paused, writing
 * nothing, until an operator chooses. Returns the migration's id once it waits for that choice.
 */
async function powerLossOfBAfterCont(vm: string): Promise<string> {
  await faults.startVm(vm);
  await armFaultPoint('B', 'destination-dies-after-cont');
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  assert.ok(id);
  await waitAgentDead('B', 180_000);
  await cluster.startAgent('B');
  const waiting = await pollUntil(
    async () => {
      const record = await cluster.api.migration(id);
      assert.ok(!['completed', 'failed', 'cancelled'].includes(record.phase), `migration ${id} ended ${record.phase} by itself: ${record.report?.recovery ?? ''}`);
      return /B cannot tell whether the guest ran there/.test(record.report?.error?.message ?? '') ? record : undefined;
    },
    { timeoutMs: 60_000, intervalMs: 200, timeoutMessage: () => `migration ${id} never said that B cannot tell` },
  );
  assert.match(waiting.report?.error?.message ?? '', new RegExp(`vmferry migration resolve ${id} --run-on A .* or vmferry migration resolve ${id} --run-on B`));
  assert.equal((await new AgentClient(cluster.host('A').agentUrl).getVm(vm)).state, 'paused', 'the source is kept paused');
  const acked = await acksOn(vm, 'A');
  await sleep(2_000);
  assert.equal(await acksOn(vm, 'A'), acked, 'the guest does not run on A while nobody can tell');
  assert.equal((await cluster.api.migration(id)).phase, 'unresolved', 'still waiting for an operator');
  return id;
}

test("destination QEMU and agent both killed right after the cont: B cannot tell whether the guest ran, so A stays paused until an operator chooses; resolve --run-on A resumes it there", async () => {
  const vm = 'both-lost';
  const id = await powerLossOfBAfterCont(vm);
  const resolved = await runVmferry(cluster.controllerUrl, ['migration', 'resolve', id, '--run-on', 'A'], 120_000);
  assert.equal(resolved.code, 0, resolved.stderr);
  assert.match(resolved.stdout, /failed: an operator chose A/);
  const record = await cluster.api.migration(id);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.recovery ?? '', /both-lost resumed on A from where it paused/);
  const held = (await cluster.api.quarantine('B')).filter((entry) => entry.vm === vm);
  assert.ok(held.some((entry) => entry.items.some((item) => item.kind === 'pool-image' && item.sizeBytes !== null)), "B's disks of it are kept in its quarantine");
  const outcome = await faults.assertSettled(vm, 'A');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'agent',
    tried: "destination QEMU and then its agent killed (SIGKILL) right after the cont, before the agent recorded that the guest ran: a power loss of B",
    observed: `B's restarted agent found its record at resume-sent and no QEMU, and said it cannot tell whether the guest ran there; the migration stayed unresolved with A paused (no new acknowledged records) until an operator ran migration resolve --run-on A; A resumed, B's disks kept in its quarantine; ${outcome}`,
    ok: true,
  });
});

test("the same power loss of B, resolved --run-on B: B takes the VM back from its quarantine, stopped; A's QEMU stops; started on B, every acknowledged record is there", async () => {
  const vm = 'both-lost-b';
  const id = await powerLossOfBAfterCont(vm);
  // A's log (the guest paused there since the cont) goes to A's quarantine with its disks; B's starts anew with the VM.
  const ackedBefore = await faults.acked(vm);
  const resolved = await runVmferry(cluster.controllerUrl, ['migration', 'resolve', id, '--run-on', 'B'], 120_000);
  assert.equal(resolved.code, 0, resolved.stderr);
  const record = await cluster.api.migration(id);
  assert.equal(record.phase, 'completed', record.report?.recovery);
  const placed = await cluster.api.vm(vm);
  assert.deepEqual([placed.host, placed.state], ['B', 'stopped'], `${vm} is B's now, stopped, to be started as after any crash`);
  assert.deepEqual((await faults.qemuPids(vm)).get('A'), [], "A's copy of the guest, paused since the cont, is stopped");
  assert.equal((await cluster.api.quarantine('B')).filter((entry) => entry.vm === vm).length, 0, "B's disks left its quarantine: they are the VM's now");
  const keptOnA = (await cluster.api.quarantine('A')).filter((entry) => entry.vm === vm);
  assert.ok(keptOnA.some((entry) => entry.items.some((item) => item.kind === 'pool-image' && (item.sizeBytes ?? 0) > 0)), "A's disks, an older state of the guest, are kept in A's quarantine, not left in its pool as nobody's");
  assert.match(record.report?.recovery ?? '', /its local disks are kept on A .* in its quarantine/);
  const restarted = await faults.startAgain(vm, 'B', ackedBefore);
  const outcome = await faults.assertSettled(vm, 'B');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'agent',
    tried: 'the same power loss of B right after the cont, and an operator choosing B (migration resolve --run-on B)',
    observed: `B took the VM back from its quarantine, stopped, and A stopped its paused QEMU and moved its disks to its quarantine (they lay in its pool as nobody's before); the migration completed with the VM placed on B; ${restarted}; ${outcome}`,
    ok: true,
  });
});

/**
 * B's QEMU dies at its resume while B's agent lives: the guest ran there (QEMU announced RESUME), so it lives
 * there now, crashed. The migration completes, A's stale copy is retired, and B keeps the VM with its disks,
 * stopped, for a start as after any crash: never a guest on both hosts, never a VM on neither.
 */
async function destinationQemuDiesAtResume(vm: string, point: string): Promise<string> {
  await faults.startVm(vm);
  await armFaultPoint('B', point);
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  const record = await faults.finalRecord(id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  assert.match(record.report?.recovery ?? '', /QEMU of VM .* exited .*; B then confirmed that the guest ran there/);
  const placed = await cluster.api.vm(vm);
  assert.deepEqual([placed.host, placed.state], ['B', 'stopped'], `${vm} stays B's, stopped, with its disks`);
  assert.deepEqual((await faults.qemuPids(vm)).get('A'), [], 'A, retired, runs no copy of the guest');
  // A's log left with A's half; what B's guest acknowledged in its moments there is in B's.
  const restarted = await faults.startAgain(vm, 'B', await faults.acked(vm));
  return `${restarted}; ${await faults.assertSettled(vm, 'B')}`;
}

test("destination QEMU killed after it ran the cont and before its reply: it announced RESUME, so the guest lives on B; B keeps the VM to start again, A never resumes", async () => {
  const outcome = await destinationQemuDiesAtResume('cont-crash', 'destination-qemu-dies-in-cont');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'qemu',
    tried: "destination QEMU killed (SIGKILL) after it ran the cont, before its reply reached B's agent",
    observed: `B's agent read QEMU's RESUME event, sent before the vCPUs run, so B said the guest ran there: the migration completed, A retired, the VM kept on B stopped and started again; ${outcome}`,
    ok: true,
  });
});

test("destination QEMU killed right after answering the cont, before its agent adopted it: B keeps the VM and its disks, stopped; started again, every acknowledged record is there", async () => {
  const outcome = await destinationQemuDiesAtResume('ran-crash', 'destination-qemu-dies-after-cont');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'qemu',
    tried: "destination QEMU killed (SIGKILL) right after it answered the cont, before B's agent adopted the guest",
    observed: `B's agent adopted the VM whose guest had run there although its QEMU was gone (it was lost from every host before: chaos seed 30118 run 3); the migration completed, A retired; ${outcome}`,
    ok: true,
  });
});

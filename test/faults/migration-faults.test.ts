// Failures in the middle of a migration, end to end: two hosts in their own
// network namespaces (a bridge to the controller and the storage server, and a
// direct veth pair between the hosts that carries the migration), the test
// guest writing to a local and a shared disk throughout. After each fault the
// VM runs on exactly one host, every acknowledged record is intact, nothing
// is left behind on the other host, and the migration record says why.
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pino from 'pino';
import type { VmInfo } from '../../src/api/agent-types.ts';
import { AgentClient } from '../../src/agent/client.ts';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import { checkVerify, readGuestReport, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import type { MigrationRecord } from '../../src/store/store.ts';
import { runProgram } from '../../src/util/run.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
let cluster: LocalCluster;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  assert.equal(process.getuid?.(), 0, 'the fault tests build network namespaces and need root (CI runs as root)');
  work = await makeTempDir('faults');
  cluster = await LocalCluster.start({
    workDir: join(work.path, 'cluster'),
    hostIds: ['A', 'B'],
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    namespaces: true,
    network: { prefix: 'vmff', subnet: '10.213.17', hostLinkSubnet: '10.213.18' },
    // Its own process, so a test can kill it as a crash would.
    controllerProcess: true,
  });
});
after(async () => {
  await cluster?.stop();
  await work?.remove();
});

function reportLogs(vm: string): string[] {
  return cluster.hosts.map((h) => join(h.dataDir, 'vms', vm, 'serial1.log'));
}

/** Pids of every QEMU of this VM, by host (its run directory lies in the host's data directory). */
async function qemuPids(vm: string): Promise<Map<string, number[]>> {
  const found = new Map<string, number[]>(cluster.hosts.map((h) => [h.id, []]));
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    if (!cmdline.startsWith('qemu-system')) continue;
    for (const host of cluster.hosts) {
      if (cmdline.includes(join(host.dataDir, 'vms', vm, 'qemu'))) found.get(host.id)?.push(Number(entry));
    }
  }
  return found;
}

async function startVm(vm: string, options: { rootMiB?: number; bulkMiBs?: number } = {}): Promise<void> {
  await cluster.storage.volumes.create(`${vm}-data`, 64 * MiB);
  const { host, port } = cluster.storageNbd;
  await cluster.api.createVm('A', {
    name: vm,
    memoryMiB: 192,
    boot: { kind: 'test-guest', options: { spanMiB: 8, intervalMs: 0, ...(options.bulkMiBs ? { bulkMiBs: options.bulkMiBs } : {}) } },
    disks: [
      { id: 'root', local: { sizeBytes: (options.rootMiB ?? 64) * MiB } },
      { id: 'data', shared: { server: { type: 'inet', host, port }, export: `${vm}-data` } },
    ],
  });
  await cluster.api.startVm(vm);
  await waitForAcks(reportLogs(vm), ['root', 'data'], { atLeast: 20, timeoutMs: 90_000 });
}

async function waitForPhase(id: string, phases: string[], timeoutMs: number): Promise<MigrationRecord> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const record = await cluster.api.migration(id);
    if (phases.includes(record.phase)) return record;
    if (Date.now() > deadline) throw new Error(`migration ${id} is "${record.phase}", not ${phases.join('/')}, after ${timeoutMs} ms`);
    await sleep(100);
  }
}

/**
 * Everything a user relies on after a fault: the VM runs on `host` and nowhere
 * else, its guest keeps acknowledging writes, the other host has neither a
 * QEMU nor a volume of it, and (after a forced stop) verify mode finds every
 * acknowledged record. The VM and its volume are removed afterwards.
 */
async function assertSettled(vm: string, host: string): Promise<string> {
  const info: VmInfo = await cluster.api.vm(vm);
  assert.equal(info.host, host, `the controller places ${vm} on ${host}`);
  assert.equal(info.state, 'running');
  const pids = await qemuPids(vm);
  const other = host === 'A' ? 'B' : 'A';
  assert.equal(pids.get(host)?.length, 1, `exactly one QEMU of ${vm} on ${host}`);
  assert.deepEqual(pids.get(other), [], `no QEMU of ${vm} left on ${other}`);
  const otherPool = await readdir(join(cluster.host(other).dataDir, 'pool'));
  assert.deepEqual(otherPool.filter((f) => f.startsWith(`${vm}-`)), [], `no volume of ${vm} left in ${other}'s pool`);

  const before = (await readGuestReport(reportLogs(vm))).acks;
  await waitForAcks(reportLogs(vm), ['root', 'data'], { atLeast: 10, since: before, timeoutMs: 60_000 });
  await cluster.api.stopVm(vm, true);
  const report = await readGuestReport(reportLogs(vm));
  const spec = (await cluster.api.vm(vm)).spec;
  const verify = await verifyDisks(spec.disks, join(work.path, `verify-${vm}`), { spanMiB: 8 });
  assert.deepEqual(checkVerify(verify, report.acks), [], 'every acknowledged record is intact');
  await cluster.api.deleteVm(vm);
  await cluster.storage.volumes.remove(`${vm}-data`);
  return `VM on ${host} only, guest kept writing, ${[...report.acks.values()].reduce((a, b) => a + b, 0)} acked records intact, nothing left on ${other}`;
}

async function finalRecord(id: string): Promise<MigrationRecord> {
  await waitForPhase(id, ['completed', 'failed', 'cancelled'], 180_000);
  return cluster.api.migration(id);
}

/** Kills the QEMU of `vm` on `host` with SIGKILL. */
async function killQemu(vm: string, host: string): Promise<void> {
  const [pid] = (await qemuPids(vm)).get(host) ?? [];
  assert.ok(pid, `a QEMU of ${vm} runs on ${host}`);
  process.kill(pid, 'SIGKILL');
}

for (const phase of ['mirroring', 'migrating'] as const) {
  test(`destination QEMU killed while ${phase}: the migration fails and the VM keeps running on the source`, async () => {
    const vm = `kill-${phase.slice(0, 3)}`;
    await startVm(vm);
    const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
    await waitForPhase(id as string, [phase], 60_000);
    await sleep(500);
    await killQemu(vm, 'B');
    const record = await finalRecord(id as string);
    assert.equal(record.phase, 'failed');
    assert.ok(record.report?.error?.message, 'the record says why');
    const outcome = await assertSettled(vm, 'A');
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'migration',
      tried: `destination QEMU killed (SIGKILL) while ${phase}`,
      observed: `failed: "${record.report?.error?.message.slice(0, 140)}"; ${outcome}`,
      ok: true,
    });
  });
}

test('destination agent killed mid-migration: the VM stays on the source; the restarted agent removes the orphan', async () => {
  const vm = 'kill-agent';
  await startVm(vm);
  const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
  await waitForPhase(id as string, ['mirroring'], 60_000);
  await cluster.killAgent('B');
  const record = await finalRecord(id as string);
  assert.equal(record.phase, 'failed');
  assert.match(record.report?.error?.message ?? '', /B|unreachable|reach/i);
  await cluster.startAgent('B');
  await cluster.waitForHosts(['A', 'B'], 30_000);
  const outcome = await assertSettled(vm, 'A');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'migration',
    tried: 'destination agent killed (SIGKILL) during the mirror, then restarted',
    observed: `failed: "${record.report?.error?.message.slice(0, 140)}"; the restarted agent killed the orphan incoming QEMU and its volume; ${outcome}`,
    ok: true,
  });
});

for (const phase of ['mirroring', 'migrating'] as const) {
  test(`controller killed while ${phase} and restarted: it finds the migration unfinished, rolls it back, the VM runs on the source`, async () => {
    const vm = `ctl-${phase.slice(0, 3)}`;
    // New data on the local disk keeps the (capped) mirror busy for seconds, long enough to kill the controller inside it.
    await startVm(vm, { rootMiB: 256, bulkMiBs: 4 });
    const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
    await waitForPhase(id as string, [phase], 60_000);
    await cluster.killController();
    // Nothing drives the migration meanwhile; QEMU's own pre-copy carries on.
    await sleep(3_000);
    await cluster.startController();
    const record = await finalRecord(id as string);
    assert.equal(record.phase, 'failed');
    assert.match(record.report?.recovery ?? '', new RegExp(`the controller restarted while the migration was ${phase}; rolled back: ${vm} runs on A`));
    const outcome = await assertSettled(vm, 'A');
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'controller',
      tried: `controller killed (SIGKILL) while ${phase}, restarted 3 s later`,
      observed: `the restarted controller asked the agents and rolled back: "${record.report?.recovery}"; ${outcome}`,
      ok: true,
    });
  });
}

test('controller killed just after the destination resumed: the restarted controller finishes the migration', async () => {
  const vm = 'ctl-resumed';
  await startVm(vm);
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
  const record = await finalRecord(id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  // The kill lands between the resume and the source's retirement nearly always; if the old controller got there first, it finished on its own.
  const path = record.report?.recovery ? 'finished by the restarted controller' : 'completed before the kill landed';
  if (record.report?.recovery) assert.match(record.report.recovery, /the guest already ran on B, so the source was retired/);
  const outcome = await assertSettled(vm, 'B');
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
  await startVm(vm, { rootMiB: 256, bulkMiBs: 4 });
  const pool = join(cluster.host('B').dataDir, 'pool');
  // Room for what the disk holds now (the plan checks that), not for what the guest writes during the mirror.
  await inAgentMounts('B', ['mount', '-t', 'tmpfs', '-o', 'size=96m', 'vmferry-pool-full', pool]);
  try {
    const { id } = await cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: 2 });
    const record = await finalRecord(id as string);
    assert.equal(record.phase, 'failed');
    assert.match(record.report?.error?.message ?? '', /no space left on device/i);
    assert.equal((await inAgentMounts('B', ['ls', '-A', pool])).trim(), '', "nothing left in B's (full) pool");
    const guestLog = await readFile(reportLogs(vm)[0] as string, 'utf8');
    assert.doesNotMatch(guestLog, /GUEST-ERROR/, 'the guest never saw a write error');
    const outcome = await assertSettled(vm, 'A');
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

// The link cut between the hosts is not in the suite yet: when the cut lands in the RAM phase (the
// test VM's mirror can finish first), QEMU 7.2's main loop blocks on the dead migration socket and
// rollback's QMP commands time out (docs/RELIABILITY.md, known problems). It needs an OOB yank.

test('the storage server restarted under a running VM and during a migration: QEMU reconnects, the migration completes', async () => {
  const vm = 'storage-restart';
  await startVm(vm);
  await cluster.restartStorage(2_000);
  const guestLog = await readFile(reportLogs(vm)[0] as string, 'utf8');
  assert.doesNotMatch(guestLog, /GUEST-ERROR/);
  const acks = (await readGuestReport(reportLogs(vm))).acks;
  await waitForAcks(reportLogs(vm), ['root', 'data'], { atLeast: 10, since: acks, timeoutMs: 60_000 });

  // No bandwidth cap: see the note on long pre-copy runs in docs/RELIABILITY.md.
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  await waitForPhase(id as string, ['preparing', 'mirroring', 'migrating', 'switching-over', 'completed'], 60_000);
  await cluster.restartStorage(1_000);
  const record = await finalRecord(id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  assert.doesNotMatch(await readFile(reportLogs(vm)[1] as string, 'utf8'), /GUEST-ERROR/);
  const outcome = await assertSettled(vm, 'B');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'storage server stopped for 2 s under a running VM, then for 1 s during its migration',
    observed: `no guest I/O error (QEMU's NBD client reconnected within reconnect-delay); migration completed; ${outcome}`,
    ok: true,
  });
});

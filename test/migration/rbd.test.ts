// Shared volumes on Ceph RBD, on a real throwaway Ceph cluster (src/demo/ceph.ts):
// the image tools through the CLI, and a VM with a local, an NBD and an RBD disk
// migrating A → B and back while the test guest writes; the cluster killed and restarted
// under a writing VM; and `vmferry demo --storage ceph`,
// which starts a Ceph cluster of its own. Its own npm script
// (`npm run test:ceph`): it takes minutes. The fence and the planner's probe run in
// npm test (test/storage/rbd-fence.test.ts); here the switch-over fence is shown in a migration, through its helper and
// with its helper killed; a rollback after the fence, which gives the source's disk a new client; and a VM whose QEMU
// an older agent started (no raw node over its RBD client) migrating.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { join } from 'node:path';
import { checkVerify, waitForAcks } from '../../src/guest/test-guest.ts';
import { runMigration } from '../../src/migration/executor.ts';
import { defaultMigrationOptions, planMigration } from '../../src/migration/plan.ts';
import { probeDestination, probeSource, qemuCapabilities } from '../../src/migration/probe.ts';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { QemuSource } from '../../src/migration/qemu-source.ts';
import type { QemuProcess } from '../../src/qemu/process.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';
import { imageWatchers, listImages, type RbdImageRef } from '../../src/storage/rbd.ts';
import type { QmpEventListener } from '../../src/qmp/events.ts';
import { armFaultPoint } from '../../src/util/fault-points.ts';
import { blocklistAddedAt, fenceHelpers, QemuIo, startCeph, type TestCeph } from '../support/ceph.ts';
import { runVmferry, type CliResult } from '../support/cli.ts';
import { MigrationRig } from '../support/migration-rig.ts';
import { recordReliability } from '../support/reliability.ts';

let ceph: TestCeph;

before(async () => {
  const started = Date.now();
  ceph = await startCeph();
  console.log(`# Ceph cluster up in ${Date.now() - started} ms`);
});

after(async () => {
  const started = Date.now();
  await ceph?.stop();
  console.log(`# Ceph cluster down in ${Date.now() - started} ms`);
});

const MiB = 1024 * 1024;

test('vmferry volume … --backend rbd: created, listed with its clients, grown (never shrunk), removed (refused while open)', async () => {
  const rbd = ['--backend', 'rbd', '--pool', ceph.pool, '--ceph-conf', ceph.client.conf, '--ceph-user', ceph.client.user];
  const volume = (...args: string[]): Promise<CliResult> => runVmferry('http://127.0.0.1:9', ['volume', ...args, ...rbd]);
  assert.match((await volume('create', 'tools', '--size', '16M')).stdout, /created RBD image rbd\/tools \(16\.0 MiB\)/);
  const listed = await runVmferry('http://127.0.0.1:9', ['--json', 'volume', 'list', ...rbd]);
  assert.deepEqual((JSON.parse(listed.stdout) as { name: string; sizeBytes: number; watchers: string[] }[]).map((i) => [i.name, i.sizeBytes, i.watchers]), [['tools', 16 * MiB, []]]);
  assert.match((await volume('resize', 'tools', '--size', '32M')).stdout, /is now 32\.0 MiB/);
  const shrink = await volume('resize', 'tools', '--size', '8M');
  assert.notEqual(shrink.code, 0);
  assert.match(shrink.stderr, /refusing to shrink/);
  const holder = await QemuIo.open({ pool: ceph.pool, image: 'tools', ...ceph.client });
  try {
    const refused = await volume('rm', 'tools');
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /open by 1 client/);
  } finally {
    await holder.close();
  }
  assert.equal((await volume('rm', 'tools')).code, 0);
  assert.deepEqual(await listImages(ceph.client, ceph.pool), []);
  const noPool = await runVmferry('http://127.0.0.1:9', ['volume', 'create', 'x', '--size', '1M', '--backend', 'rbd']);
  assert.match(noPool.stderr, /--backend rbd needs --pool/);
});

test('local + NBD + RBD disks migrate A → B and back under writes: every acked record intact, 0 bytes for both shared kinds', async () => {
  const started = Date.now();
  const rig = await MigrationRig.start(
    'rbdmix',
    { local: [{ id: 'root', sizeMiB: 64, fillMiB: 4 }], shared: [{ id: 'nbd0', sizeMiB: 32 }], rbd: [{ id: 'rbd0', sizeMiB: 32, ...cephDisk() }] },
    { mode: 'workload', spanMiB: 8 },
  );
  try {
    await rig.waitForAcks(20);
    const there = await rig.migrate(await rig.plan());
    assert.equal(there.outcome, 'completed', there.error?.message);
    assert.deepEqual(there.disks.map((d) => [d.id, d.operation]), [['root', 'mirror'], ['nbd0', 'reattach'], ['rbd0', 'reattach']]);
    assert.deepEqual(there.disks.filter((d) => d.operation === 'reattach').map((d) => d.bytesSent), [0, 0]);
    const onB = rig.destination?.vm;
    assert.ok(onB);
    assert.equal(rig.source.isAlive, false, 'the guest runs on B only');
    assert.equal((await onB.status()).status, 'running');
    // The only client of the RBD image left is B's QEMU: A's was fenced at switch-over and has quit.
    const rbdRef = rbdSource(onB.spec);
    assert.equal((await imageWatchers(rbdRef, rbdRef.pool, rbdRef.image)).length, 1);

    const logs = [...rig.reportLogs()];
    const disks = rig.writableDiskIds();
    const acked = (await waitForAcks(logs, disks, { atLeast: 0, timeoutMs: 90_000 })).acks;
    await waitForAcks(logs, disks, { atLeast: 10, since: acked, timeoutMs: 90_000 });

    // And back: B is the source now, A an empty destination again.
    const qemu = await qemuCapabilities();
    const back = new QemuDestination({ hostId: 'A', pool: rig.poolA, vmDir: (vm) => join(rig.dir, 'runA2', vm), address: '127.0.0.1' });
    rig.cleanup.add('stop the second QEMU on A', () => back.vm?.kill());
    const plan = planMigration(onB.spec, await probeSource('B', onB, qemu), await probeDestination('A', '127.0.0.1', onB.spec, rig.poolA, [], qemu), defaultMigrationOptions);
    assert.deepEqual(plan.refusals, []);
    const home = await runMigration({ spec: onB.spec, plan, source: new QemuSource({ hostId: 'B', vm: onB }), destination: back });
    assert.equal(home.outcome, 'completed', home.error?.message);
    assert.deepEqual(home.disks.filter((d) => d.operation === 'reattach').map((d) => [d.id, d.bytesSent]), [['nbd0', 0], ['rbd0', 0]]);
    const onA = back.vm;
    assert.ok(onA);
    assert.equal(onB.isAlive, false, 'the guest runs on A only');
    assert.equal((await onA.status()).status, 'running');

    const allLogs = [...logs, join(rig.dir, 'runA2', 'rbdmix', 'serial1.log')];
    const beforeBack = (await waitForAcks(allLogs, disks, { atLeast: 0, timeoutMs: 90_000 })).acks;
    await waitForAcks(allLogs, disks, { atLeast: 10, since: beforeBack, timeoutMs: 90_000 });
    await onA.kill();
    const verify = await rig.verify(onA.spec.disks);
    const final = (await waitForAcks(allLogs, disks, { atLeast: 0, timeoutMs: 90_000 })).acks;
    assert.deepEqual(checkVerify(verify, final), []);
    console.log(`# migration test (two migrations, verify) took ${Date.now() - started} ms`);
  } finally {
    await rig.cleanup.run();
  }
});

test('the switch-over fences A\'s RBD client through the helper B readied at prepare: blocklisted before B\'s guest runs, a stale writer\'s writes refused, no helper left', async () => {
  const rig = await MigrationRig.start('rbdfence', { local: [{ id: 'root', sizeMiB: 32 }], shared: [], rbd: [{ id: 'rbd0', sizeMiB: 32, ...cephDisk() }] }, { mode: 'workload', spanMiB: 8 });
  const ref = rbdSource(rig.spec);
  let stale: QemuIo | undefined;
  let resumes: QmpEventListener | undefined;
  try {
    await rig.waitForAcks(20);
    const sourceClients = await imageWatchers(ref, ref.pool, ref.image);
    assert.equal(sourceClients.length, 1, "A's QEMU is the image's one client");
    // A stale writer besides A's QEMU (a host that lost its VM and did not die): the fence cuts off every client but B's own.
    stale = await QemuIo.open(ref);
    const staleClients = (await imageWatchers(ref, ref.pool, ref.image)).filter((address) => !sourceClients.includes(address));
    let helpersAtSwitchover: number[] = [];
    const report = await rig.migrate(await rig.plan(), {
      beforePhase: async (phase) => {
        if (phase !== 'resume-sent') return;
        // The guest is paused on A, B not continued yet: the fence is to come, and its helper already runs.
        helpersAtSwitchover = await fenceHelpers();
        resumes = rig.destination?.vm?.monitor.client.listen();
      },
    });
    assert.equal(report.outcome, 'completed', report.error?.message);
    assert.equal(helpersAtSwitchover.length, 1, 'the fence helper ran, connected, when the switch-over began');
    assert.deepEqual(await fenceHelpers(), [], 'no fence helper runs once the guest runs on B');
    const resumedAtUs = resumes?.takeBuffered('RESUME').at(-1)?.timestampUs;
    assert.ok(resumedAtUs !== undefined, "B's QEMU announced the guest's RESUME");
    const blocklisted = await blocklistAddedAt(ceph.client);
    for (const address of [...sourceClients, ...staleClients]) {
      const addedAt = blocklisted.get(address);
      assert.ok(addedAt !== undefined, `${address} is blocklisted`);
      assert.ok(addedAt * 1000 < resumedAtUs, `${address} was blocklisted ${addedAt * 1000 - resumedAtUs} µs after B's guest resumed`);
    }
    // Past the workload's span, so that a write that got through would not touch the guest's records.
    assert.match(await stale.run('write -P 0x55 24M 4k'), /write failed/);
    const logs = [...rig.reportLogs()];
    const acked = (await waitForAcks(logs, rig.writableDiskIds(), { atLeast: 0, timeoutMs: 90_000 })).acks;
    await waitForAcks(logs, rig.writableDiskIds(), { atLeast: 10, since: acked, timeoutMs: 90_000 });
    const resumeMs = report.phases.find((p) => p.phase === 'resume-sent')?.durationMs;
    console.log(`# resume-sent (B's fence through the helper, then cont) took ${resumeMs} ms`);
  } finally {
    resumes?.close();
    await stale?.close();
    await rig.cleanup.run();
  }
});

test('the fence helper killed at switch-over: the switch-over fails naming it, the guest runs on in A, A\'s client is not fenced', async () => {
  const rig = await MigrationRig.start('rbdnofence', { local: [{ id: 'root', sizeMiB: 32 }], shared: [], rbd: [{ id: 'rbd0', sizeMiB: 32, ...cephDisk() }] }, { mode: 'workload', spanMiB: 8 });
  const ref = rbdSource(rig.spec);
  try {
    await rig.waitForAcks(20);
    const sourceClients = await imageWatchers(ref, ref.pool, ref.image);
    let killed: number[] = [];
    const report = await rig.migrate(await rig.plan(), {
      beforePhase: async (phase) => {
        if (phase !== 'resume-sent') return;
        killed = await fenceHelpers();
        for (const pid of killed) process.kill(pid, 'SIGKILL');
      },
    });
    assert.equal(killed.length, 1, 'one fence helper ran when the switch-over began');
    assert.equal(report.outcome, 'failed');
    assert.match(report.error?.message ?? '', /could not fence the other clients of the RBD images \(rbd\/rbdnofence-rbd0\): the RBD fence helper \(pid \d+\) exited \(SIGKILL\)/);
    assert.equal(rig.source.isAlive, true);
    assert.equal((await rig.source.status()).status, 'running', 'the guest runs on A again');
    assert.equal(rig.destination?.vm, undefined, "B's QEMU is gone");
    assert.deepEqual(await fenceHelpers(), []);
    const blocklisted = await blocklistAddedAt(ceph.client);
    assert.deepEqual(sourceClients.filter((address) => blocklisted.has(address)), [], "A's client was not fenced");
    const before = await rig.waitForAcks(0);
    const after = await rig.waitForAcks(10, before.acks);
    assert.deepEqual(after.errors, [], 'no I/O error reached the guest');
    assert.ok((after.acks.get('rbd0') ?? 0) > (before.acks.get('rbd0') ?? 0), 'the guest writes its RBD disk on A');
    const verify = await rig.verify(rig.spec.disks);
    assert.deepEqual(checkVerify(verify, (await rig.waitForAcks(0)).acks), []);
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'RBD volume',
      tried: 'the RBD fence helper killed (SIGKILL) after the guest paused on A for the switch-over, before B fenced A',
      observed: `the migration failed naming the helper (${report.error?.code ?? '?'}); B never resumed, A's client was not blocklisted, the guest ran on in A and wrote its RBD disk; every acknowledged record intact`,
      ok: true,
    });
  } finally {
    await rig.cleanup.run();
  }
});

test("B's QEMU killed right after its fence blocklisted A's RBD client: the rollback gives A's disk a new client, the guest runs on in A alone, and what it writes after is acknowledged and intact", async () => {
  const rig = await MigrationRig.start('rbdswap', { local: [{ id: 'root', sizeMiB: 32 }], shared: [], rbd: [{ id: 'rbd0', sizeMiB: 32, ...cephDisk() }] }, { mode: 'workload', spanMiB: 8 });
  const ref = rbdSource(rig.spec);
  let ioErrors: QmpEventListener | undefined;
  try {
    await rig.waitForAcks(20);
    const sourceClients = await imageWatchers(ref, ref.pool, ref.image);
    assert.equal(sourceClients.length, 1, "A's QEMU is the image's one client");
    // QEMU reports every failed guest request, stop policy or not: none may fail on A from here on.
    ioErrors = rig.source.monitor.client.listen();
    armFaultPoint('destination-qemu-dies-after-fence');
    // Not retried: a second attempt would complete, and this one's rollback is what is looked at.
    const report = await rig.migrate(await rig.plan(), { memoryMismatchRetries: 0 });
    assert.equal(report.outcome, 'failed', 'rolled back');
    console.log(`# the migration failed with: ${report.error?.message ?? '?'}; the guest's pause, A's STOP to its RESUME: ${report.pauseMs ?? '?'} ms`);
    const blocklisted = await blocklistAddedAt(ceph.client);
    assert.deepEqual(sourceClients.filter((address) => !blocklisted.has(address)), [], "B's fence blocklisted A's client before B's QEMU died");
    assert.equal(rig.destination?.vm, undefined, "B's QEMU is gone");
    assert.deepEqual(await fenceHelpers(), []);
    // Without a new client the guest would stop at its first write to rbd0 (werror=stop): no new acks at all.
    const before = await rig.waitForAcks(0);
    const after = await waitForAcks(rig.reportLogs(), rig.writableDiskIds(), { atLeast: 10, since: before.acks, timeoutMs: 30_000 });
    assert.deepEqual(after.errors, [], 'no I/O error reached the guest');
    assert.equal((await rig.source.status()).status, 'running', 'the guest runs in A, never stopped on an I/O error');
    assert.deepEqual(ioErrors.takeBuffered('BLOCK_IO_ERROR').map((e) => e.data), [], 'no request of the guest failed on A, not even one retried after a stop');
    const clients = await imageWatchers(ref, ref.pool, ref.image);
    assert.equal(clients.length, 1, "the image has one client: A's QEMU's new one");
    assert.ok(!blocklisted.has(clients[0] ?? ''), "A's new client is not on the blocklist");
    assert.ok(!sourceClients.includes(clients[0] ?? ''), "A's client is a new one");
    const verify = await rig.verify(rig.spec.disks);
    const final = (await rig.waitForAcks(0)).acks;
    assert.ok((final.get('rbd0') ?? 0) >= (before.acks.get('rbd0') ?? 0) + 10);
    assert.deepEqual(checkVerify(verify, final), []);
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'RBD volume',
      tried: "B's QEMU killed (SIGKILL) right after B's switch-over fence blocklisted A's RBD client, before B's cont",
      observed: `the migration rolled back (${report.error?.code ?? '?'}); A's RBD disk got a new librbd client before the guest continued there (A's old client blocklisted, the new one not); the guest ran on in A alone, wrote ${(final.get('rbd0') ?? 0) - (before.acks.get('rbd0') ?? 0)} records to its RBD disk after the rollback without an I/O error, every acknowledged record intact`,
      ok: true,
    });
  } finally {
    ioErrors?.close();
    await rig.cleanup.run();
  }
});

test("a VM whose QEMU an agent before the raw node started (its RBD device on the rbd node itself) migrates to B under writes; there the disk has the raw node over its client; every acked record intact", async () => {
  const sourceBinary = join(import.meta.dirname, '..', 'support', 'qemu-before-rbd-format-node.py');
  const rig = await MigrationRig.start('rbdolder', { local: [{ id: 'root', sizeMiB: 32 }], shared: [], rbd: [{ id: 'rbd0', sizeMiB: 32, ...cephDisk() }], sourceBinary }, { mode: 'workload', spanMiB: 8 });
  try {
    assert.deepEqual(await fileChildren(rig.source), [['disk-root', 'disk-root-file']], "A's RBD device sits on the rbd node itself, as an older agent started it");
    await rig.waitForAcks(20);
    const report = await rig.migrate(await rig.plan());
    assert.equal(report.outcome, 'completed', report.error?.message);
    const onB = rig.destination?.vm;
    assert.ok(onB);
    assert.equal(rig.source.isAlive, false, 'the guest runs on B only');
    assert.deepEqual(await fileChildren(onB), [['disk-rbd0', 'disk-rbd0-file'], ['disk-root', 'disk-root-file']]);
    const acked = (await rig.waitForAcks(0)).acks;
    const after = await rig.waitForAcks(10, acked);
    assert.deepEqual(after.errors, []);
    const logs = rig.reportLogs();
    const verify = await rig.verify(onB.spec.disks);
    assert.deepEqual(checkVerify(verify, (await waitForAcks(logs, rig.writableDiskIds(), { atLeast: 0, timeoutMs: 90_000 })).acks), []);
  } finally {
    await rig.cleanup.run();
  }
});

test('the Ceph cluster killed and restarted under a running VM: the guest waits, sees no I/O error, writes again; every acked record intact', async () => {
  const rig = await MigrationRig.start('rbdrestart', { local: [{ id: 'root', sizeMiB: 32 }], shared: [], rbd: [{ id: 'rbd0', sizeMiB: 32, ...cephDisk() }] }, { mode: 'workload', spanMiB: 8 });
  try {
    await rig.waitForAcks(20);
    const statuses = new Set<string>();
    let watching = true;
    const watch = (async (): Promise<void> => {
      while (watching) {
        statuses.add((await rig.source.status()).status);
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
    })();
    const outageStarted = Date.now();
    let duringOutage: Map<string, number>;
    let outageEnded: Map<string, number>;
    try {
      await ceph.killDaemons('SIGKILL');
      // Longer down than the OSD's watch timeout, so librbd's watch on the image is lost too and must be set up again.
      await new Promise((resolve) => setTimeout(resolve, 3_000));
      duringOutage = (await rig.waitForAcks(0)).acks;
      await new Promise((resolve) => setTimeout(resolve, 5_000));
      outageEnded = (await rig.waitForAcks(0)).acks;
      await ceph.startDaemons();
    } finally {
      watching = false;
      await watch;
    }
    const outageMs = Date.now() - outageStarted;
    assert.equal(outageEnded.get('rbd0'), duringOutage.get('rbd0'), 'no write to the RBD disk was acknowledged while Ceph was down');
    const after = await rig.waitForAcks(20, outageEnded);
    assert.deepEqual(after.errors, [], 'no I/O error reached the guest');
    assert.deepEqual([...statuses], ['running'], 'the VM was never stopped: librbd waits for the cluster rather than failing the request');
    assert.equal((await rig.source.status()).status, 'running');
    const verify = await rig.verify(rig.spec.disks);
    const final = (await rig.waitForAcks(0)).acks;
    assert.deepEqual(checkVerify(verify, final), []);
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'RBD volume',
      tried: 'the Ceph cluster (monitor and OSD) killed with SIGKILL under a VM writing to an RBD disk, down 8 s, restarted on the same data and addresses',
      observed: `the VM stayed running, never paused and no I/O error reached the guest: its RBD writes waited in librbd through the ${Math.round(outageMs / 1000)} s outage; ${(after.acks.get('rbd0') ?? 0) - (outageEnded.get('rbd0') ?? 0)} new acks on the RBD disk after the restart; every acknowledged record intact`,
      ok: true,
    });
  } finally {
    await rig.cleanup.run();
  }
});

test('vmferry demo --storage ceph --json: the shared disk on RBD through both migrations, every acknowledged record verified', async () => {
  const started = Date.now();
  const demo = await runVmferry('http://127.0.0.1:9', ['--json', 'demo', '--storage', 'ceph'], 600_000);
  assert.equal(demo.code, 0, `the demo failed:\n${demo.stderr}\n${demo.stdout}`);
  const summary = JSON.parse(demo.stdout.trim().split('\n').at(-1) ?? '') as {
    migrations: { from: string; to: string; disks: { id: string; operation: string; bytesSent: number; backend?: string }[] }[];
    verified: boolean;
  };
  assert.deepEqual(summary.migrations.map((m) => [m.from, m.to]), [['A', 'B'], ['B', 'A']]);
  for (const migration of summary.migrations) {
    assert.deepEqual(migration.disks.map((d) => [d.id, d.operation, d.backend]), [['root', 'mirror', undefined], ['data', 'reattach', 'rbd']]);
    assert.equal(migration.disks.find((d) => d.id === 'data')?.bytesSent, 0);
  }
  assert.equal(summary.verified, true);
  console.log(`# vmferry demo --storage ceph took ${Date.now() - started} ms`);
});

/** Each block node with a `file` child, and that child, by node name, sorted: read from QEMU's graph, as rbd-client-swap.ts reads it. */
async function fileChildren(vm: QemuProcess): Promise<[string, string][]> {
  const graph = await vm.monitor.client.execute<{ nodes: { id: number; name: string }[]; edges: { parent: number; child: number; name: string }[] }>('x-debug-query-block-graph');
  const name = (id: number): string => graph.nodes.find((node) => node.id === id)?.name ?? '?';
  return graph.edges.filter((edge) => edge.name === 'file').map((edge): [string, string] => [name(edge.parent), name(edge.child)]).sort(([a], [b]) => a.localeCompare(b));
}

function cephDisk(): { client: TestCeph['client']; pool: string } {
  return { client: ceph.client, pool: ceph.pool };
}

function rbdSource(spec: VmSpec): RbdImageRef {
  const disk = spec.disks.find((d) => d.source.kind === 'rbd');
  assert.ok(disk?.source.kind === 'rbd');
  return disk.source;
}

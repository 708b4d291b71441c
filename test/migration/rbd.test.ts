// Shared volumes on Ceph RBD, on a real throwaway Ceph cluster (test/support/ceph.ts):
// the image tools, the blocklist fence against a stale writer, the planner's probe
// from the destination, and a VM with a local, an NBD and an RBD disk migrating A → B
// and back while the test guest writes.
import assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { after, before, test } from 'node:test';
import { join } from 'node:path';
import { checkVerify, waitForAcks } from '../../src/guest/test-guest.ts';
import { runMigration } from '../../src/migration/executor.ts';
import { defaultMigrationOptions, planMigration } from '../../src/migration/plan.ts';
import { probeDestination, probeSource, qemuCapabilities } from '../../src/migration/probe.ts';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { QemuSource } from '../../src/migration/qemu-source.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';
import { createImage, imageWatchers, listImages, qemuImageJson, removeImage, type RbdImageRef } from '../../src/storage/rbd.ts';
import { RbdWriter, rbdWatchers } from '../../src/storage/rbd-fence.ts';
import { runProgram } from '../../src/util/run.ts';
import { startCeph, type TestCeph } from '../support/ceph.ts';
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

test('a fenced writer: its writes fail at once, the new writer\'s land', async () => {
  await createImage(ceph.client, ceph.pool, 'fence', 16 * MiB);
  const ref: RbdImageRef = { pool: ceph.pool, image: 'fence', ...ceph.client };
  const spec = specWith(ref);
  const stale = await QemuIo.open(ref);
  let next: QemuIo | undefined;
  try {
    assert.match(await stale.run('write -P 0x11 0 64k'), /wrote 65536/);
    // As a migration's destination does: note the clients, open, learn its own, fence the rest.
    const earlier = await rbdWatchers(spec);
    next = await QemuIo.open(ref);
    const writer = await RbdWriter.learn(spec, earlier);
    assert.equal(writer.own.get('data')?.length, 1);
    const fenced = await writer.fenceOthers();
    assert.deepEqual(fenced.get('data'), earlier.get('data'));
    // The stale writer's writes fail (ESHUTDOWN) once the OSD has the new map, milliseconds later.
    const fencedAt = Date.now();
    let refusedAfterMs: number | undefined;
    for (let i = 0; i < 100 && refusedAfterMs === undefined; i++) {
      if (/write failed/.test(await stale.run('write -P 0x33 1M 4k'))) refusedAfterMs = Date.now() - fencedAt;
      else await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(refusedAfterMs !== undefined, 'the fenced writer could still write 5 s after the fence');
    console.log(`# the fenced writer's first refused write came ${refusedAfterMs} ms after the fence`);
    assert.match(await stale.run('write -P 0x33 0 64k'), /write failed/);
    assert.match(await next.run('write -P 0x22 0 64k'), /wrote 65536/);
    assert.match(await next.run('flush'), /^(?!.*failed)/s);
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'RBD volume',
      tried: 'a stale writer keeps an RBD image open while a new writer takes it (the destination\'s switch-over fence)',
      observed: `the stale writer blocklisted: its writes refused ${refusedAfterMs} ms after the fence and from then on; the new writer's writes land`,
      ok: true,
    });
  } finally {
    await stale.close();
    await next?.close();
  }
  const check = await runProgram('qemu-io', ['-r', '-c', 'read -P 0x22 0 64k', qemuImageJson(ref)]);
  assert.doesNotMatch(check, /Pattern verification failed/);
  await removeImage(ceph.client, ceph.pool, 'fence');
});

test('a destination that cannot open the RBD image is refused before anything moves', async () => {
  const rig = await MigrationRig.start('rbdrefuse', { local: [], shared: [], rbd: [{ id: 'data', sizeMiB: 16, ...cephDisk() }] }, { mode: 'workload', spanMiB: 4 });
  try {
    const plan = await rig.plan();
    assert.deepEqual(plan.refusals, []);
    assert.deepEqual(plan.disks.map((d) => [d.id, d.operation, d.bytesToCopy]), [['data', 'reattach', 0]]);
    // An image B cannot open (here: none of that name), as a host without a route or a key to Ceph sees every image.
    const spec = structuredClone(rig.spec);
    const disk = spec.disks[0];
    assert.ok(disk?.source.kind === 'rbd');
    disk.source.image = 'no-such-image';
    const refused = await rig.plan({}, spec);
    assert.match(refused.refusals.join('\n'), /B cannot reach shared volume rbd:rbd\/no-such-image/);
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'RBD volume',
      tried: 'the destination cannot open the VM\'s RBD image',
      observed: 'migration refused at planning, naming the image; nothing started',
      ok: true,
    });
  } finally {
    await rig.cleanup.run();
  }
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

function cephDisk(): { client: TestCeph['client']; pool: string } {
  return { client: ceph.client, pool: ceph.pool };
}

function rbdSource(spec: VmSpec): RbdImageRef {
  const disk = spec.disks.find((d) => d.source.kind === 'rbd');
  assert.ok(disk?.source.kind === 'rbd');
  return disk.source;
}

function specWith(ref: RbdImageRef): VmSpec {
  return { name: 'fence', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: '/nonexistent' }, disks: [{ id: 'data', source: { kind: 'rbd', ...ref } }] };
}

/** An interactive qemu-io on an RBD image: one librbd client that stays open between commands, as a QEMU's would. */
class QemuIo {
  readonly #child: ChildProcessWithoutNullStreams;
  #output = '';

  private constructor(child: ChildProcessWithoutNullStreams) {
    this.#child = child;
    child.stdout.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
  }

  static async open(ref: RbdImageRef): Promise<QemuIo> {
    const io = new QemuIo(spawn('qemu-io', [qemuImageJson(ref)]));
    await io.#prompt();
    return io;
  }

  /** Runs one command and returns what it printed, once qemu-io asks for the next. */
  async run(command: string): Promise<string> {
    this.#output = '';
    this.#child.stdin.write(`${command}\n`);
    return this.#prompt();
  }

  async #prompt(): Promise<string> {
    const deadline = Date.now() + 30_000;
    while (!this.#output.includes('qemu-io> ')) {
      if (this.#child.exitCode !== null) throw new Error(`qemu-io exited: ${this.#output}`);
      if (Date.now() > deadline) throw new Error(`qemu-io did not answer within 30 s: ${this.#output}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return this.#output.replace('qemu-io> ', '');
  }

  async close(): Promise<void> {
    if (this.#child.exitCode !== null) return;
    const exited = new Promise((resolve) => this.#child.once('exit', resolve));
    this.#child.stdin.end('quit\n');
    const timer = setTimeout(() => this.#child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
}

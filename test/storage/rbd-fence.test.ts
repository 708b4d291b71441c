// The one-writer guarantees of RBD shared volumes on a real throwaway Ceph cluster
// (src/demo/ceph.ts): the blocklist fence against a stale writer, and the
// planner's probe from the destination. Migrations on RBD: test/migration/rbd.test.ts.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { VmSpec } from '../../src/qemu/spec.ts';
import { createImage, qemuImageJson, removeImage, type RbdImageRef } from '../../src/storage/rbd.ts';
import { RbdWriter, rbdWatchers } from '../../src/storage/rbd-fence.ts';
import { runProgram } from '../../src/util/run.ts';
import { QemuIo, startCeph, type TestCeph } from '../support/ceph.ts';
import { MigrationRig } from '../support/migration-rig.ts';
import { recordReliability } from '../support/reliability.ts';

let ceph: TestCeph;

before(async () => {
  const started = Date.now();
  ceph = await startCeph();
  console.log(`# Ceph cluster up in ${Date.now() - started} ms`);
});

after(async () => {
  await ceph?.stop();
});

const MiB = 1024 * 1024;

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
  const rig = await MigrationRig.start('rbdrefuse', { local: [], shared: [], rbd: [{ id: 'data', sizeMiB: 16, client: ceph.client, pool: ceph.pool }] }, { mode: 'workload', spanMiB: 4 });
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

function specWith(ref: RbdImageRef): VmSpec {
  return { name: 'fence', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: '/nonexistent' }, disks: [{ id: 'data', source: { kind: 'rbd', ...ref } }] };
}

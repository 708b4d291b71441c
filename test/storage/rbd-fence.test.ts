// The one-writer guarantees of RBD shared volumes on a real throwaway Ceph cluster
// (src/demo/ceph.ts): the blocklist fence against a stale writer, and the
// planner's probe from the destination. Migrations on RBD: test/migration/rbd.test.ts.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { VmferryError } from '../../src/errors.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';
import { createImage, qemuImageJson, removeImage, type RbdImageRef } from '../../src/storage/rbd.ts';
import { RbdWriter, rbdWatchers } from '../../src/storage/rbd-fence.ts';
import { runProgram } from '../../src/util/run.ts';
import { fenceHelpers, QemuIo, startCeph, waitGone, type TestCeph } from '../support/ceph.ts';
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

/** A new 16 MiB image with a writer already on it (the stale one, as a source's QEMU would be), and its ref and spec. */
async function imageWithStaleWriter(image: string): Promise<{ ref: RbdImageRef; spec: VmSpec; stale: QemuIo }> {
  await createImage(ceph.client, ceph.pool, image, 16 * MiB);
  const ref: RbdImageRef = { pool: ceph.pool, image, ...ceph.client };
  return { ref, spec: specWith(ref), stale: await QemuIo.open(ref) };
}

for (const path of ['helper', 'cli'] as const) {
  const how = path === 'helper' ? 'through the fence helper started beforehand' : 'through the rbd and ceph programs (no helper started)';
  test(`a fenced writer: its writes fail at once, the new writer's land (${how})`, async () => {
    const image = `fence-${path}`;
    const { ref, spec, stale } = await imageWithStaleWriter(image);
    let next: QemuIo | undefined;
    try {
      assert.match(await stale.run('write -P 0x11 0 64k'), /wrote 65536/);
      // As a migration's destination does: note the clients, open, learn its own, ready the fence, fence the rest.
      const earlier = await rbdWatchers(spec);
      next = await QemuIo.open(ref);
      const writer = await RbdWriter.learn(spec, earlier);
      assert.equal(writer.own.get('data')?.length, 1);
      if (path === 'helper') await writer.readyFence();
      const helperPid = writer.fenceHelperPid;
      assert.equal(helperPid !== undefined, path === 'helper');
      const fenceStarted = performance.now();
      const fenced = await writer.fenceOthers();
      const fenceMs = Math.round(performance.now() - fenceStarted);
      assert.deepEqual(fenced.get('data'), earlier.get('data'));
      // The helper fences once: it is gone as soon as it has.
      if (helperPid !== undefined) await waitGone(helperPid);
      assert.equal(writer.fenceHelperPid, undefined);
      // The stale writer's writes fail (ESHUTDOWN) once the OSD has the new map, milliseconds later.
      const fencedAt = Date.now();
      let refusedAfterMs: number | undefined;
      for (let i = 0; i < 100 && refusedAfterMs === undefined; i++) {
        if (/write failed/.test(await stale.run('write -P 0x33 1M 4k'))) refusedAfterMs = Date.now() - fencedAt;
        else await new Promise((resolve) => setTimeout(resolve, 50));
      }
      assert.ok(refusedAfterMs !== undefined, 'the fenced writer could still write 5 s after the fence');
      console.log(`# ${path}: the fence took ${fenceMs} ms; the fenced writer's first refused write came ${refusedAfterMs} ms after it`);
      assert.match(await stale.run('write -P 0x33 0 64k'), /write failed/);
      assert.match(await next.run('write -P 0x22 0 64k'), /wrote 65536/);
      assert.match(await next.run('flush'), /^(?!.*failed)/s);
      recordReliability(import.meta.url, {
        kind: 'fault',
        target: 'RBD volume',
        tried: `a stale writer keeps an RBD image open while a new writer takes it (the destination's switch-over fence, ${how})`,
        observed: `the stale writer blocklisted: its writes refused ${refusedAfterMs} ms after the fence and from then on; the new writer's writes land`,
        ok: true,
      });
    } finally {
      await stale.close();
      await next?.close();
    }
    const check = await runProgram('qemu-io', ['-r', '-c', 'read -P 0x22 0 64k', qemuImageJson(ref)]);
    assert.doesNotMatch(check, /Pattern verification failed/);
    await removeImage(ceph.client, ceph.pool, image);
  });
}

for (const failure of ['killed', 'stopped'] as const) {
  const what = failure === 'killed' ? 'killed (SIGKILL)' : 'hung (SIGSTOP)';
  test(`a fence helper ${what} before the fence: the fence fails, naming it, fences nobody, and leaves no helper behind`, async () => {
    const image = `fence-${failure}`;
    const { ref, spec, stale } = await imageWithStaleWriter(image);
    let next: QemuIo | undefined;
    try {
      const earlier = await rbdWatchers(spec);
      next = await QemuIo.open(ref);
      const writer = await RbdWriter.learn(spec, earlier);
      await writer.readyFence();
      const pid = writer.fenceHelperPid;
      assert.ok(pid !== undefined, 'the fence helper started');
      process.kill(pid, failure === 'killed' ? 'SIGKILL' : 'SIGSTOP');
      const started = performance.now();
      const err = await writer.fenceOthers().then(
        () => assert.fail('the fence succeeded without its helper'),
        (e: unknown) => e,
      );
      const failedAfterMs = Math.round(performance.now() - started);
      assert.ok(err instanceof VmferryError);
      assert.match(err.message, new RegExp(`could not fence the other clients of the RBD images \\(rbd/${image}\\): the RBD fence helper \\(pid ${pid}\\) `));
      if (failure === 'killed') {
        assert.equal(err.code, 'VMF_COMMAND_FAILED');
        assert.match(err.message, /exited \(SIGKILL\)/);
      } else {
        // Its deadline, then it is killed: a hung helper neither holds the switch-over nor stays.
        assert.equal(err.code, 'VMF_TIMEOUT');
        assert.match(err.message, /did not fence the other clients within 10000 ms, and was killed/);
        assert.ok(failedAfterMs < 15_000, `the fence failed after ${failedAfterMs} ms`);
      }
      await waitGone(pid);
      console.log(`# a helper ${what}: the fence failed after ${failedAfterMs} ms: ${err.message}`);
      // Nobody was fenced: the earlier writer still writes.
      assert.match(await stale.run('write -P 0x44 0 64k'), /wrote 65536/);
      recordReliability(import.meta.url, {
        kind: 'fault',
        target: 'RBD volume',
        tried: `the RBD switch-over fence's helper ${what} before the fence`,
        observed: `the fence failed after ${failedAfterMs} ms with ${err.code}, naming the helper; nobody fenced, no helper process left`,
        ok: true,
      });
    } finally {
      await stale.close();
      await next?.close();
    }
    await removeImage(ceph.client, ceph.pool, image);
  });
}

test('a fence helper that cannot start: no process left, and the fence goes through the rbd and ceph programs instead', async () => {
  await createImage(ceph.client, ceph.pool, 'fence-nostart', 16 * MiB);
  const ref: RbdImageRef = { pool: ceph.pool, image: 'fence-nostart', ...ceph.client };
  const spec = specWith(ref);
  const writer = await RbdWriter.learn(spec, await rbdWatchers(spec));
  // Gone before the helper could open it: the helper fails to start, as it would without python3-rados or a reachable cluster.
  await removeImage(ceph.client, ceph.pool, 'fence-nostart');
  await writer.readyFence();
  assert.equal(writer.fenceHelperPid, undefined);
  assert.deepEqual(await fenceHelpers(), [], 'the helper that failed to start does not run');
  // The fence then runs the CLI, which names the missing image too.
  await assert.rejects(writer.fenceOthers(), /rbd --conf .* status --format json rbd\/fence-nostart: .*No such file or directory/s);
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

// The test guest on a shared volume: QEMU's own NBD client talking to our server.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { checkVerify, reportLogOf, testGuestSpec, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import type { DiskSpec } from '../../src/qemu/spec.ts';
import { makeTempDir } from '../support/temp.ts';
import { serveWithQemuNbd, type NbdExport } from '../support/qemu-nbd.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';

let storage: TestStorage;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  storage = await startTestStorage();
  work = await makeTempDir('guest-shared');
  await storage.server.volumes.create('shared0', 32 * 1024 * 1024);
});
after(async () => {
  await storage.stop();
  await work.remove();
});

test('the test guest writes acknowledged records to a shared volume, and every one is there afterwards', async () => {
  const disks: DiskSpec[] = [{ id: 'shared0', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, export: 'shared0' } }];
  const spec = testGuestSpec('onshared', disks, work.path, { mode: 'workload', spanMiB: 8 });
  const vm = await QemuProcess.start(spec, { runDir: join(work.path, 'run') });
  try {
    await waitForAcks([reportLogOf(spec)], ['shared0'], { atLeast: 100, timeoutMs: 60_000 });
    assert.equal(storage.server.nbd.connections().filter((c) => c.export === 'shared0').length, 1);
  } finally {
    await vm.kill();
    await vm.cleanup();
  }
  const acked = (await waitForAcks([reportLogOf(spec)], ['shared0'], { atLeast: 100, timeoutMs: 1000 })).acks;
  const verify = await verifyDisks(disks, work.path, { spanMiB: 8 });
  assert.deepEqual(checkVerify(verify, acked), []);
});

test('a VM whose storage server comes up 2 s after QEMU starts still starts, and its guest writes there', async () => {
  // As when the storage server restarts while a migration's destination QEMU opens the volume.
  const image = join(work.path, 'late.raw');
  await promisify(execFileCallback)('qemu-img', ['create', '-q', '-f', 'raw', image, '32M']);
  const socket = join(work.path, 'late.nbd.sock');
  const disks: DiskSpec[] = [{ id: 'late0', source: { kind: 'nbd', server: { type: 'unix', path: socket }, export: 'late' } }];
  const spec = testGuestSpec('latestorage', disks, work.path, { mode: 'workload', spanMiB: 8 });
  const server = sleep(2_000).then(() => serveWithQemuNbd(image, 'raw', work.path, 'late'));
  let nbd: NbdExport | undefined;
  const startedAt = Date.now();
  try {
    const vm = await QemuProcess.start(spec, { runDir: join(work.path, 'run-late') });
    nbd = await server;
    try {
      assert.ok(Date.now() - startedAt >= 2_000, 'QEMU started before its storage server existed: the test proves nothing');
      await waitForAcks([reportLogOf(spec)], ['late0'], { atLeast: 20, timeoutMs: 60_000 });
    } finally {
      await vm.kill();
      await vm.cleanup();
    }
  } finally {
    nbd ??= await server;
    await nbd.stop();
  }
});

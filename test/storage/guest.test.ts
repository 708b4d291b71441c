// The test guest on a shared volume: QEMU's own NBD client talking to our server (or to qemu-nbd),
// through the server's late start and a longer outage.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { startIoErrorResume } from '../../src/agent/io-error-resume.ts';
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

test('a storage server gone longer than QEMU waits stops the VM instead of failing its I/O; the agent continues it when the server is back, every acknowledged write intact', async () => {
  const image = join(work.path, 'outage.raw');
  await promisify(execFileCallback)('qemu-img', ['create', '-q', '-f', 'raw', image, '32M']);
  let nbd = await serveWithQemuNbd(image, 'raw', work.path, 'outage');
  const disks: DiskSpec[] = [{ id: 'outage0', source: { kind: 'nbd', server: { type: 'unix', path: nbd.socket }, export: 'outage' } }];
  const spec = testGuestSpec('outage', disks, work.path, { mode: 'workload', spanMiB: 8 });
  const log = [reportLogOf(spec)];
  // QEMU waits 1 s for the server here instead of a minute, so the outage outlasts it quickly.
  const vm = await QemuProcess.start(spec, { runDir: join(work.path, 'run-outage'), reconnectDelayS: 1 });
  const stopResume = startIoErrorResume({ candidates: () => [{ name: spec.name, qemu: vm, spec, free: () => true }], logger: pino({ level: 'silent' }), intervalMs: 200 });
  try {
    await waitForAcks(log, ['outage0'], { atLeast: 20, timeoutMs: 60_000 });
    await nbd.stop();
    const stoppedBy = Date.now() + 20_000;
    let state = (await vm.status()).status;
    while (state !== 'io-error' && Date.now() < stoppedBy) {
      await sleep(100);
      state = (await vm.status()).status;
    }
    assert.equal(state, 'io-error', 'the failed request stopped the VM (the guest saw no I/O error)');
    const beforeReturn = (await waitForAcks(log, ['outage0'], { atLeast: 0, timeoutMs: 1000 })).acks;
    await sleep(1_000);
    assert.equal((await vm.status()).status, 'io-error', 'nothing continues the VM while its storage server is away');
    await rm(nbd.socket, { force: true });
    nbd = await serveWithQemuNbd(image, 'raw', work.path, 'outage');
    await waitForAcks(log, ['outage0'], { atLeast: 20, since: beforeReturn, timeoutMs: 30_000 });
    assert.equal((await vm.status()).status, 'running');
  } finally {
    stopResume();
    await vm.kill();
    await vm.cleanup();
    await nbd.stop();
  }
  const acked = (await waitForAcks(log, ['outage0'], { atLeast: 0, timeoutMs: 1000 })).acks;
  // Verified against the image itself: the records the guest was told are written are all there.
  const verify = await verifyDisks([{ id: 'outage0', source: { kind: 'file', path: image, format: 'raw' } }], work.path, { spanMiB: 8 });
  assert.deepEqual(checkVerify(verify, acked), []);
});

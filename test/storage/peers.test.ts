// The storage server against real NBD peers: nbdinfo, qemu-io, qemu-img, nbdcopy.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { StorageIoWatch } from '../../src/controller/storage-io.ts';
import { requestJson } from '../../src/http/errors.ts';
import type { MigrationReport } from '../../src/migration/phases.ts';
import type { MigrationPlan } from '../../src/migration/plan.ts';
import { NbdClient } from '../../src/nbd/client.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';
import type { VolumeStats } from '../../src/storage/traffic.ts';
import { makeTempDir } from '../support/temp.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';

const execFile = promisify(execFileCallback);
let storage: TestStorage;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  storage = await startTestStorage();
  work = await makeTempDir('peers');
  await storage.server.volumes.create('vol', 64 * 1024 * 1024);
  await storage.server.volumes.create('iso', 8 * 1024 * 1024, true);
});

after(async () => {
  await storage.stop();
  await work.remove();
});

async function qemuIo(uri: string, ...commands: string[]): Promise<string> {
  return qemuIoWith([], uri, ...commands);
}

async function qemuIoWith(flags: string[], uri: string, ...commands: string[]): Promise<string> {
  const args = [...flags, '-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri];
  const { stdout } = await execFile('qemu-io', args);
  return stdout;
}

function volumeStats(volume: string): Promise<VolumeStats> {
  return requestJson<VolumeStats>(storage.adminUrl, 'GET', `/v1/volumes/${volume}/stats`);
}

test('nbdinfo sees the flags, the base:allocation context, block sizes and the export list', async () => {
  const { stdout } = await execFile('nbdinfo', ['--json', storage.uri('vol')]);
  const info = JSON.parse(stdout) as { protocol: string; structured: boolean; exports: Record<string, unknown>[] };
  assert.equal(info.protocol, 'newstyle-fixed');
  assert.equal(info.structured, true);
  const vol = info.exports[0] as Record<string, unknown>;
  assert.equal(vol['export-size'], 64 * 1024 * 1024);
  assert.deepEqual(vol.contexts, ['base:allocation']);
  for (const flag of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_multi_conn']) assert.equal(vol[flag], true, flag);
  assert.equal(vol.is_read_only, false);
  assert.equal(vol.block_size_minimum, 1);
  assert.equal(vol.block_size_preferred, 4096);
  assert.equal(vol.block_size_maximum, 32 * 1024 * 1024);

  const iso = JSON.parse((await execFile('nbdinfo', ['--json', storage.uri('iso')])).stdout) as { exports: Record<string, unknown>[] };
  assert.equal(iso.exports[0]?.is_read_only, true);

  const list = (await execFile('nbdinfo', ['--list', storage.uri('')])).stdout;
  assert.match(list, /export="iso"/);
  assert.match(list, /export="vol"/);
});

test('two qemu-io clients write and read patterns on one volume at the same time; the server counts the bytes of each', async () => {
  const before = await volumeStats('vol');
  await Promise.all([
    qemuIo(storage.uri('vol'), 'aio_write -P 0xa1 0 4M', 'aio_write -P 0xa2 8M 4M', 'aio_flush', 'flush'),
    qemuIo(storage.uri('vol'), 'aio_write -P 0xb1 4M 4M', 'aio_write -P 0xb2 12M 4M', 'aio_flush', 'flush'),
  ]);
  // Each client reads what the other wrote; qemu-io fails on a pattern mismatch.
  const out = await Promise.all([
    qemuIo(storage.uri('vol'), 'read -P 0xb1 4M 4M', 'read -P 0xb2 12M 4M'),
    qemuIo(storage.uri('vol'), 'read -P 0xa1 0 4M', 'read -P 0xa2 8M 4M'),
  ]);
  for (const text of out) assert.doesNotMatch(text, /Pattern verification failed/);

  // Four connections, each wrote or read 8 MiB: the volume's counters and each connection's agree with what the clients did.
  const after = await volumeStats('vol');
  const MiB = 1024 * 1024;
  assert.equal(after.countingSince, before.countingSince);
  assert.equal(after.bytesWritten - before.bytesWritten, 16 * MiB);
  assert.equal(after.bytesRead - before.bytesRead, 16 * MiB);
  const known = new Set(before.connections.map((c) => `${c.client}@${c.connectedAt}`));
  const fresh = after.connections.filter((c) => !known.has(`${c.client}@${c.connectedAt}`));
  assert.ok(fresh.every((c) => /^127\.0\.0\.1:\d+$/.test(c.client)), JSON.stringify(fresh));
  assert.deepEqual(fresh.map((c) => [c.bytesRead, c.bytesWritten]).sort(), [[0, 8 * MiB], [0, 8 * MiB], [8 * MiB, 0], [8 * MiB, 0]]);
});

test('qemu-img converts an image into a volume and compares it identical', async () => {
  const source = join(work.path, 'source.qcow2');
  await execFile('qemu-img', ['create', '-q', '-f', 'qcow2', source, '64M']);
  await execFile('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 1M 3M', '-c', 'write -P 0x43 40M 1M', source]);
  await storage.server.volumes.create('converted', 64 * 1024 * 1024);
  await execFile('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', source, storage.uri('converted')]);
  const compare = await execFile('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', source, storage.uri('converted')]);
  assert.match(compare.stdout, /Images are identical/);
  const info = JSON.parse((await execFile('qemu-img', ['info', '--output=json', storage.uri('converted')])).stdout) as { 'virtual-size': number };
  assert.equal(info['virtual-size'], 64 * 1024 * 1024);
});

test('a volume that was never written reports itself a hole (base:allocation)', async () => {
  await storage.server.volumes.create('empty', 16 * 1024 * 1024);
  const { stdout } = await execFile('nbdinfo', ['--map', storage.uri('empty')]);
  assert.match(stdout, /^\s*0\s+16777216\s+3\s+hole,zero/m);
});

test('nbdcopy copies a volume out and a file in, byte for byte', async () => {
  const out = join(work.path, 'out.raw');
  await execFile('nbdcopy', [storage.uri('vol'), out]);
  const copied = readFileSync(out);
  assert.equal(copied.length, 64 * 1024 * 1024);
  assert.equal(copied[4 * 1024 * 1024], 0xb1);
  assert.equal(copied[0], 0xa1);
  await storage.server.volumes.create('copyin', 64 * 1024 * 1024);
  await execFile('nbdcopy', [out, storage.uri('copyin')]);
  await execFile('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out, storage.uri('copyin')]);
});

test('a read-only volume is advertised read-only: QEMU will not open it for writing, and reads work', async () => {
  // (That the server itself answers EPERM to a write is tested byte by byte in bad-input.test.ts.)
  await assert.rejects(qemuIo(storage.uri('iso'), 'write -P 0x66 0 4k'), /Permission denied/);
  const text = await qemuIoWith(['-r'], storage.uri('iso'), 'read -P 0 0 4k');
  assert.doesNotMatch(text, /Pattern verification failed/);
});

test("a migration's report gives a re-attached disk what the storage server counted, or says why it cannot", async () => {
  const spec: VmSpec = {
    name: 'web',
    vcpus: 1,
    memoryMiB: 128,
    boot: { kind: 'kernel', kernel: '/k' },
    disks: [{ id: 'data', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, export: 'io@A.0123abcd' } }],
  };
  const plan = { disks: [{ id: 'data', operation: 'reattach' }] } as MigrationPlan;
  const report = { disks: [{ id: 'data', operation: 'reattach', bytesSent: 0, virtualSize: 1 << 20 }] } as MigrationReport;
  await storage.server.volumes.create('io', 1 << 20);
  const logger = pino({ level: 'silent' });
  const watch = await StorageIoWatch.start({ url: storage.adminUrl }, spec, plan, logger);
  const blind = await StorageIoWatch.start(undefined, spec, plan, logger);
  // The guest's I/O while it migrates, through one connection (QEMU's) and then another.
  for (const [write, read] of [[3 * 4096, 4096], [4096, 0]] as const) {
    const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, { exportName: 'io' });
    await client.write(0, Buffer.alloc(write, 1));
    if (read) await client.read(0, read);
    await client.close();
  }
  assert.deepEqual((await watch.finish(report)).disks[0]?.storageIo, { measured: true, bytesRead: 4096, bytesWritten: 4 * 4096 });
  assert.deepEqual((await blind.finish(report)).disks[0]?.storageIo, { measured: false, why: 'the controller was started without --storage, so it cannot ask the storage server' });
});

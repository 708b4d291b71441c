// One writer per shared volume: once a volume's writer lease is granted, only
// the client whose export name carries the holder's token writes; every other
// write gets EPERM and nothing of it reaches the file. Checked with qemu-io
// and vmferry's NBD client at byte level, and with two QEMUs running the test
// guest on one volume.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import Database from 'better-sqlite3';
import pino from 'pino';
import { checkVerify, readGuestReport, reportLogOf, testGuestSpec, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import { requestJson } from '../../src/http/errors.ts';
import { NbdClient, NbdRequestError } from '../../src/nbd/client.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import type { DiskSpec } from '../../src/qemu/spec.ts';
import { StorageServer } from '../../src/storage/server.ts';
import type { Volume } from '../../src/storage/volumes.ts';
import { SharedWriterFence } from '../../src/storage/writer-fence.ts';
import { WriterLeases } from '../../src/storage/writer-leases.ts';
import { Cleanup } from '../support/cleanup.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
const cleanup = new Cleanup();
let dir: string;
let server: StorageServer;
let nbdPort: number;
let adminUrl: string;

async function startServer(): Promise<void> {
  server = await StorageServer.start({
    dataDir: join(dir, 'storage'),
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    nbd: { host: '127.0.0.1', port: nbdPort },
    admin: { host: '127.0.0.1', port: 0 },
  });
  nbdPort = server.addresses.nbdPort as number;
  adminUrl = server.addresses.adminUrl as string;
}

before(async () => {
  const temp = await makeTempDir('fencing');
  cleanup.add('temp dir', () => temp.remove());
  dir = temp.path;
  nbdPort = 0;
  await startServer();
  cleanup.add('storage server', () => server.close());
});
after(() => cleanup.run());

/** One qemu-io write through an export name; resolves to qemu-io's verdict, never throws. */
async function qemuIoWrite(exportName: string, pattern: number, offset: number, length: number): Promise<string> {
  const image = `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=${nbdPort},file.export=${exportName}`;
  // qemu-io reports a failed write on stdout and exits 1: keep both streams.
  return new Promise((resolve) => {
    execFile('qemu-io', ['--image-opts', image, '-c', `write -P 0x${pattern.toString(16)} ${offset} ${length}`], { timeout: 30_000 }, (_err, stdout, stderr) =>
      resolve(`${stdout}${stderr}`),
    );
  });
}

async function volumeBytes(name: string, offset: number, length: number): Promise<Buffer> {
  const file = await readFile(join(dir, 'storage', 'volumes', `${name}.raw`));
  return file.subarray(offset, offset + length);
}

function grant(volume: string, holder: string, generation: number): Promise<Volume['writer']> {
  return requestJson(adminUrl, 'PUT', `/v1/volumes/${volume}/writer`, { body: { holder, generation } });
}

test('once a writer is granted, every other client gets EPERM and none of its bytes land; the lease survives a restart', async () => {
  await server.volumes.create('fenced', 16 * MiB);
  assert.match(await qemuIoWrite('fenced', 0x11, 0, 65536), /wrote 65536/, 'before any grant, every client writes');

  assert.deepEqual(await grant('fenced', 'host-a.1', 1), { holder: 'host-a.1', generation: 1, grantedAt: (server.volumes.get('fenced')).writer?.grantedAt });
  assert.match(await qemuIoWrite('fenced@host-a.1', 0x22, 0, 65536), /wrote 65536/);
  const stale = await qemuIoWrite('fenced@host-b.9', 0x33, 0, 65536);
  assert.match(stale, /Operation not permitted/, 'a writer without the lease is refused');
  assert.match(await qemuIoWrite('fenced', 0x44, 0, 65536), /Operation not permitted/, 'an anonymous writer is refused once the volume is fenced');
  assert.ok((await volumeBytes('fenced', 0, 65536)).every((b) => b === 0x22), 'only the holder\'s bytes are on disk');

  await grant('fenced', 'host-b.2', 2);
  assert.match(await qemuIoWrite('fenced@host-a.1', 0x55, 0, 65536), /Operation not permitted/, 'the old holder is fenced after the lease moved');
  assert.match(await qemuIoWrite('fenced@host-b.2', 0x66, 0, 65536), /wrote 65536/);

  await assert.rejects(grant('fenced', 'host-a.3', 2), /generation 2 is not newer than the current lease \(host-b\.2, generation 2\)/);
  await assert.rejects(grant('fenced', 'host-a.3', 1), /VMF_CONFLICT|not newer/);
  await assert.rejects(grant('fenced', '../etc', 3), /holder/);
  await assert.rejects(grant('nosuch', 'host-a.1', 3), /no volume named "nosuch"/);

  await server.close();
  await startServer();
  assert.deepEqual((server.volumes.get('fenced')).writer?.holder, 'host-b.2', 'the lease is in the catalog, not only in memory');
  assert.match(await qemuIoWrite('fenced@host-a.1', 0x77, 0, 65536), /Operation not permitted/);
  assert.ok((await volumeBytes('fenced', 0, 65536)).every((b) => b === 0x66));
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'stale and anonymous writers on a fenced volume (qemu-io), lease moved, stale grants replayed, server restarted',
    observed: 'non-holders get EPERM and none of their bytes land; older or equal generations are refused with 409; the lease survives the restart',
    ok: true,
  });
});

test('a writer in full flight when the lease moves: after the grant returns, not one of its writes lands', async () => {
  await server.volumes.create('inflight', 16 * MiB);
  await grant('inflight', 'host-a.1', 1);
  const stale = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: nbdPort }, { exportName: 'inflight@host-a.1' });
  cleanup.add('stale client', () => stale.close().catch(() => undefined));
  const block = Buffer.alloc(MiB, 0xab);
  let succeeded = 0;
  let refused = 0;
  let stop = false;
  // Eight writers in a loop keep the connection full of writes while the lease moves.
  const writers = Array.from({ length: 8 }, async (_, i) => {
    for (let n = 0; !stop && n < 10_000; n++) {
      try {
        await stale.write(((i * 2 + (n % 2)) % 16) * MiB, block);
        succeeded++;
      } catch (err) {
        assert.ok(err instanceof NbdRequestError && /EPERM/.test(err.message), `unexpected error: ${(err as Error).message}`);
        refused++;
      }
    }
  });
  while (succeeded < 20) await sleep(5);
  await grant('inflight', 'host-b.2', 2);
  const afterGrant = createHash('sha256').update(await readFile(join(dir, 'storage', 'volumes', 'inflight.raw'))).digest('hex');
  await sleep(300);
  stop = true;
  await Promise.all(writers);
  const later = createHash('sha256').update(await readFile(join(dir, 'storage', 'volumes', 'inflight.raw'))).digest('hex');
  assert.ok(refused > 0, 'the stale writer kept trying after the grant');
  assert.equal(later, afterGrant, 'nothing the stale writer sent after the grant returned reached the file');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'lease moved while a stale client had 8 MiB of writes in flight',
    observed: `${succeeded} writes landed before the grant returned, ${refused} refused with EPERM after; file unchanged after the grant`,
    ok: true,
  });
});

test('a grant waits for the writes that passed the check under the old lease', async () => {
  const leases = new WriterLeases(new Database(':memory:'));
  await leases.grant('vol', 'host-a.1', 1);
  let finishWrite!: () => void;
  const slowWrite = leases.write('vol', 'host-a.1', () => new Promise<void>((resolve) => (finishWrite = resolve)));
  let granted = false;
  const grantDone = leases.grant('vol', 'host-b.2', 2).then(() => (granted = true));
  await sleep(100);
  assert.equal(granted, false, 'the grant returned while the old holder still had a write in flight');
  await assert.rejects(leases.write('vol', 'host-a.1', () => Promise.resolve()), /fenced: host-b\.2 holds its write lease \(generation 2\)/);
  finishWrite();
  await slowWrite;
  await grantDone;
  assert.equal(granted, true);
});

test('two QEMUs on one volume: the one holding the lease writes, the stale one gets I/O errors and changes nothing', async () => {
  await server.volumes.create('twovms', 32 * MiB);
  const fenceA = new SharedWriterFence(adminUrl, 'host-a');
  const fenceB = new SharedWriterFence(adminUrl, 'host-b');
  const shared = (name: string): DiskSpec[] => [{ id: 'shared0', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: nbdPort }, export: name } }];
  const start = async (name: string, fence: SharedWriterFence): Promise<{ vm: QemuProcess; report: string; disks: DiskSpec[] }> => {
    const spec = await fence.tokenize(testGuestSpec(name, shared('twovms'), join(dir, name), { mode: 'workload', spanMiB: 8 }));
    await fence.claim(spec);
    const vm = await QemuProcess.start(spec, { runDir: join(dir, name, 'run') });
    cleanup.add(`VM ${name}`, async () => {
      await vm.kill();
      await vm.cleanup();
    });
    return { vm, report: reportLogOf(spec), disks: spec.disks };
  };

  const first = await start('first', fenceA);
  assert.match((first.disks[0]?.source as { export: string }).export, /^twovms@host-a\.1$/);
  await waitForAcks([first.report], ['shared0'], { atLeast: 50, timeoutMs: 90_000 });

  // The second instance claims the volume, as a migration's destination does at switch-over.
  const second = await start('second', fenceB);
  const fencedAt = (await readGuestReport([first.report])).acks.get('shared0') ?? 0;
  assert.equal((server.volumes.get('twovms')).writer?.holder, 'host-b.2');
  await waitForAcks([second.report], ['shared0'], { atLeast: 50, timeoutMs: 90_000 });
  const firstReport = await readFile(first.report, 'utf8');
  assert.match(firstReport, /GUEST-ERROR pwrite record: Input\/output error/, 'the stale guest saw its writes fail');
  const firstAcks = (await readGuestReport([first.report])).acks.get('shared0') ?? 0;
  assert.ok(firstAcks <= fencedAt + 1, `the stale guest acknowledged ${firstAcks - fencedAt} records after the lease moved`);

  await second.vm.kill();
  await first.vm.kill();
  const acked = (await readGuestReport([second.report])).acks;
  const verify = await verifyDisks(second.disks, join(dir, 'verify'), { spanMiB: 8 });
  assert.deepEqual(checkVerify(verify, acked), [], 'every record the lease holder acknowledged is intact');
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'two QEMUs running the test guest on one shared volume; the second claims the lease',
    observed: `stale guest: I/O error, ${firstAcks - fencedAt} acks after the move; holder: ${acked.get('shared0')} acks, all intact`,
    ok: true,
  });
});

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
import type { VolumeStats } from '../../src/storage/traffic.ts';
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

function volumeStats(volume: string): Promise<VolumeStats> {
  return requestJson<VolumeStats>(adminUrl, 'GET', `/v1/volumes/${volume}/stats`);
}

function grant(volume: string, holder: string): Promise<{ holder: string; generation: number; grantedAt: number }> {
  return requestJson(adminUrl, 'PUT', `/v1/volumes/${volume}/writer`, { body: { holder } });
}

test('once a writer is granted, every other client gets EPERM and none of its bytes land; the lease survives a restart', async () => {
  await server.volumes.create('fenced', 16 * MiB);
  assert.match(await qemuIoWrite('fenced', 0x11, 0, 65536), /wrote 65536/, 'before any grant, every client writes');

  assert.deepEqual(await grant('fenced', 'host-a.1'), { holder: 'host-a.1', generation: 1, grantedAt: server.volumes.get('fenced').writer?.grantedAt });
  assert.match(await qemuIoWrite('fenced@host-a.1', 0x22, 0, 65536), /wrote 65536/);
  const stale = await qemuIoWrite('fenced@host-b.9', 0x33, 0, 65536);
  assert.match(stale, /Operation not permitted/, 'a writer without the lease is refused');
  assert.match(await qemuIoWrite('fenced', 0x44, 0, 65536), /Operation not permitted/, 'an anonymous writer is refused once the volume is fenced');
  assert.ok((await volumeBytes('fenced', 0, 65536)).every((b) => b === 0x22), 'only the holder\'s bytes are on disk');
  const counted = await volumeStats('fenced');
  assert.equal(counted.bytesWritten, 2 * 65536, 'the server counts the writes that landed, not the refused ones');

  assert.equal((await grant('fenced', 'host-b.2')).generation, 2, 'the server numbers the grants');
  assert.match(await qemuIoWrite('fenced@host-a.1', 0x55, 0, 65536), /Operation not permitted/, 'the old holder is fenced after the lease moved');
  assert.match(await qemuIoWrite('fenced@host-b.2', 0x66, 0, 65536), /wrote 65536/);
  assert.equal((await grant('fenced', 'host-b.2')).generation, 2, 'granting to the holder again changes nothing');

  await assert.rejects(grant('fenced', '../etc'), /holder/);
  await assert.rejects(grant('nosuch', 'host-a.1'), /no volume named "nosuch"/);

  await server.close();
  await startServer();
  assert.equal(server.volumes.leases.get('fenced')?.holder, 'host-b.2', 'the lease is in the catalog, not only in memory');
  assert.match(await qemuIoWrite('fenced@host-a.1', 0x77, 0, 65536), /Operation not permitted/);
  assert.ok((await volumeBytes('fenced', 0, 65536)).every((b) => b === 0x66));
  const restarted = await volumeStats('fenced');
  assert.notEqual(restarted.countingSince, counted.countingSince, 'counters start again with the server, and say so');
  assert.equal(restarted.bytesWritten, 0);
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'stale and anonymous writers on a fenced volume (qemu-io), lease moved, grant repeated, server restarted',
    observed: 'non-holders get EPERM and none of their bytes land; the server numbers grants 1, 2 and a repeated grant keeps 2; the lease survives the restart',
    ok: true,
  });
});

test('a writer in full flight when the lease moves: after the grant returns, not one of its writes lands', async () => {
  await server.volumes.create('inflight', 16 * MiB);
  await grant('inflight', 'host-a.1');
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
  await grant('inflight', 'host-b.2');
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

test('a grant waits for the writes that passed the check under the old lease; writes arriving meanwhile wait for its outcome', async () => {
  const leases = new WriterLeases(new Database(':memory:'));
  await leases.grant('vol', 'host-a.1');
  let finishWrite!: () => void;
  const slowWrite = leases.write('vol', 'host-a.1', () => new Promise<void>((resolve) => (finishWrite = resolve)));
  let granted = false;
  const grantDone = leases.grant('vol', 'host-b.2').then(() => (granted = true));
  await sleep(100);
  assert.equal(granted, false, 'the grant returned while the old holder still had a write in flight');
  let lateWriteSettled = false;
  const lateWrite = assert.rejects(
    leases.write('vol', 'host-a.1', () => Promise.resolve()).finally(() => (lateWriteSettled = true)),
    /fenced: another client holds its write lease \(generation 2\)/,
  );
  await sleep(50);
  assert.equal(lateWriteSettled, false, 'a write that arrived during the grant did not wait for it');
  finishWrite();
  await slowWrite;
  await grantDone;
  assert.equal(granted, true);
  await lateWrite;
});

test('a grant whose drain times out leaves the old holder in place, in memory and in the catalog', async () => {
  const db = new Database(':memory:');
  const leases = new WriterLeases(db, { drainTimeoutMs: 300 });
  await leases.grant('vol', 'host-a.1');
  let finishWrite!: () => void;
  const slowWrite = leases.write('vol', 'host-a.1', () => new Promise<void>((resolve) => (finishWrite = resolve)));
  const waiting = leases.write('vol', 'host-a.1', () => Promise.resolve('landed'));
  await assert.rejects(leases.grant('vol', 'host-b.2'), (err: Error) => {
    assert.match(err.message, /did not finish within 0\.3 s; the lease stays where it was/);
    return true;
  });
  assert.equal(leases.get('vol')?.holder, 'host-a.1');
  assert.equal(leases.get('vol')?.generation, 1);
  assert.deepEqual(db.prepare('SELECT holder, generation FROM writer_leases').all(), [{ holder: 'host-a.1', generation: 1 }]);
  assert.equal(await waiting, 'landed', 'the old holder\'s write that waited for the failed grant goes through');
  await assert.rejects(leases.write('vol', 'host-b.2', () => Promise.resolve()), /EPERM|fenced/);
  finishWrite();
  await slowWrite;
  assert.equal((await leases.grant('vol', 'host-b.2')).generation, 2, 'once drained, the next grant gets the next generation');
});

test('the server numbers generations: a client cannot choose one, so a huge one cannot jam the volume', async () => {
  await server.volumes.create('jam', MiB);
  await assert.rejects(
    requestJson(adminUrl, 'PUT', '/v1/volumes/jam/writer', { body: { holder: 'evil.1', generation: Number.MAX_SAFE_INTEGER } }),
    /generation|additional properties/,
  );
  assert.equal(server.volumes.get('jam').writer, null, 'the refused grant changed nothing');
  const [first, second] = await Promise.all([grant('jam', 'host-a.x1'), grant('jam', 'host-b.x2')]);
  assert.deepEqual([first.generation, second.generation], [1, 2], 'concurrent grants get one generation each, in order');
  assert.equal(server.volumes.get('jam').writer?.generation, 2);
});

test('two VMs started at once on one host get distinct tokens, and only the later grant writes', async () => {
  await server.volumes.create('twins', MiB);
  const fence = new SharedWriterFence(adminUrl, 'host-a');
  const spec = testGuestSpec('twin', [{ id: 'shared0', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: nbdPort }, export: 'twins' } }], join(dir, 'twins'), {
    mode: 'workload',
    spanMiB: 1,
  });
  const start = async (): Promise<{ exportName: string; generation: number }> => {
    const tokenized = await fence.tokenize(spec);
    const [lease] = await fence.claim(tokenized);
    return { exportName: (tokenized.disks[0]?.source as { export: string }).export, generation: lease?.generation ?? 0 };
  };
  const [a, b] = await Promise.all([start(), start()]);
  assert.notEqual(a.exportName, b.exportName, 'two QEMU instances on one host share a writer token');
  const [earlier, later] = a.generation < b.generation ? [a, b] : [b, a];
  assert.match(await qemuIoWrite(later.exportName, 0x21, 0, 4096), /wrote 4096/);
  assert.match(await qemuIoWrite(earlier.exportName, 0x22, 0, 4096), /Operation not permitted/);
  assert.ok((await volumeBytes('twins', 0, 4096)).every((b) => b === 0x21));
});

test('listings never show a writer token: only that a writer exists and its generation', async () => {
  await server.volumes.create('secret', MiB);
  await grant('secret', 'host-a.s3cr3t');
  const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: nbdPort }, { exportName: 'secret@host-a.s3cr3t' });
  cleanup.add('secret client', () => client.close().catch(() => undefined));
  const listings = await Promise.all(['/v1/volumes', '/v1/volumes/secret', '/v1/connections'].map((path) => requestJson(adminUrl, 'GET', path)));
  for (const listing of listings) assert.doesNotMatch(JSON.stringify(listing), /s3cr3t/);
  const shown = listings[1] as Volume;
  assert.deepEqual(shown.writer, { generation: 1, grantedAt: shown.writer?.grantedAt, held: true });
  assert.equal(shown.attachments.length, 1);
  await client.close();
});

test('release: only the holder\'s token drops the lease, and then nobody writes until the next claim', async () => {
  await server.volumes.create('released', MiB);
  const release = (holder: string): Promise<{ released: boolean; writer: Volume['writer'] }> =>
    requestJson(adminUrl, 'POST', '/v1/volumes/released/writer/release', { body: { holder } });
  assert.deepEqual(await release('host-a.1'), { released: false, writer: null }, 'nothing to release before a grant');
  await grant('released', 'host-a.1');
  await grant('released', 'host-b.2');
  assert.equal((await release('host-a.1')).released, false, 'a stale holder cannot drop the current lease');
  assert.match(await qemuIoWrite('released@host-b.2', 0x31, 0, 4096), /wrote 4096/);

  const fence = new SharedWriterFence(adminUrl, 'host-b');
  const spec = testGuestSpec('rel', [{ id: 'shared0', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: nbdPort }, export: 'released@host-b.2' } }], join(dir, 'rel'), {
    mode: 'workload',
    spanMiB: 1,
  });
  await fence.release(spec);
  assert.deepEqual(server.volumes.get('released').writer, { generation: 2, grantedAt: server.volumes.get('released').writer?.grantedAt, held: false });
  assert.match(await qemuIoWrite('released@host-b.2', 0x32, 0, 4096), /Operation not permitted/, 'the released holder no longer writes');
  assert.match(await qemuIoWrite('released', 0x33, 0, 4096), /Operation not permitted/, 'a released volume stays fenced');
  assert.ok((await volumeBytes('released', 0, 4096)).every((b) => b === 0x31));
  assert.equal((await grant('released', 'host-a.3')).generation, 3, 'the next claim takes it, with the next generation');
  assert.match(await qemuIoWrite('released@host-a.3', 0x34, 0, 4096), /wrote 4096/);
  await fence.release({ ...spec, disks: [{ id: 'gone', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: nbdPort }, export: 'deleted-volume@host-b.2' } }] });
});

test('two QEMUs on one volume: the one holding the lease writes, the stale one is stopped by its refused writes and changes nothing', async () => {
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
  assert.match((first.disks[0]?.source as { export: string }).export, /^twovms@host-a\.[0-9a-f]{16}$/);
  await waitForAcks([first.report], ['shared0'], { atLeast: 50, timeoutMs: 90_000 });

  // The second instance claims the volume, as a migration's destination does at switch-over.
  const second = await start('second', fenceB);
  const fencedAt = (await readGuestReport([first.report])).acks.get('shared0') ?? 0;
  assert.match(server.volumes.leases.get('twovms')?.holder ?? 'none', /^host-b\./);
  await waitForAcks([second.report], ['shared0'], { atLeast: 50, timeoutMs: 90_000 });
  // Its disk stops the stale VM on the refused write (werror=stop): it does not run on, writing nothing.
  assert.equal((await first.vm.status()).status, 'io-error', 'the stale VM is stopped by its refused writes');
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
    observed: `stale VM: stopped by its refused writes (io-error), ${firstAcks - fencedAt} acks after the move; holder: ${acked.get('shared0')} acks, all intact`,
    ok: true,
  });
});

// vmferry's NBD client against real NBD servers (qemu-nbd, nbdkit, the
// storage server on a unix socket), and its errors: unreachable, no such
// export, a server that never answers, a server that hangs up mid-request.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pino from 'pino';
import type { NbdServerAddress } from '../../src/nbd/address.ts';
import { NbdClient, probeNbdExport } from '../../src/nbd/client.ts';
import { StorageServer } from '../../src/storage/server.ts';
import { Cleanup } from '../support/cleanup.ts';
import { serveWithQemuNbd } from '../support/qemu-nbd.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
const cleanup = new Cleanup();
let dir: string;

before(async () => {
  const temp = await makeTempDir('nbd-client');
  cleanup.add('temp dir', () => temp.remove());
  dir = temp.path;
});
after(() => cleanup.run());

/**
 * nbdkit on a Unix socket, once it accepts connections: it writes its pid file only then (nbdkit(1), -P).
 * The socket file alone appears at bind, before listen: a connection then was refused (CI, 2026-11-30).
 */
async function startNbdkit(name: string, args: string[], stdio: 'ignore' | 'inherit'): Promise<{ child: ChildProcess; path: string }> {
  const path = join(dir, `${name}.sock`);
  const pidFile = join(dir, `${name}.pid`);
  const child = spawn('nbdkit', ['-f', '-U', path, '-P', pidFile, ...args], { stdio: ['ignore', 'ignore', stdio] });
  for (let i = 0; i < 200 && !existsSync(pidFile); i++) await sleep(25);
  assert.ok(existsSync(pidFile), `nbdkit ${name} did not get ready within 5 s`);
  return { child, path };
}

async function nbdkit(name: string, ...args: string[]): Promise<NbdServerAddress> {
  const { child, path } = await startNbdkit(name, args, 'inherit');
  const exited = new Promise((resolve) => child.once('exit', resolve));
  cleanup.add(`nbdkit ${name}`, async () => {
    if (child.exitCode === null) child.kill('SIGTERM');
    await exited;
  });
  return { type: 'unix', path };
}

test('against qemu-nbd: size, flags, pipelined writes and reads, block status, flush', async () => {
  const image = join(dir, 'qemu-nbd.raw');
  const { execFileSync } = await import('node:child_process');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, '16M']);
  const server = await serveWithQemuNbd(image, 'raw', dir, 'disk');
  cleanup.add('qemu-nbd', () => server.stop());
  const address: NbdServerAddress = { type: 'unix', path: server.socket };

  const client = await NbdClient.connect(address, { exportName: 'disk' });
  assert.equal(client.size, 16 * MiB);
  assert.equal(client.export.structuredReplies, true);
  assert.deepEqual(client.export.metaContexts, ['base:allocation']);
  assert.equal(client.export.canFlush, true);
  assert.ok(client.export.blockSize, 'qemu-nbd sends NBD_INFO_BLOCK_SIZE');
  await Promise.all(Array.from({ length: 16 }, (_, i) => client.write(i * 64 * 1024, Buffer.alloc(64 * 1024, i + 1))));
  await client.flush();
  const data = await client.read(0, MiB);
  for (let i = 0; i < 16; i++) assert.equal(data[i * 64 * 1024 + 100], i + 1);
  const extents = await client.blockStatus(0, 16 * MiB);
  assert.equal(extents[0]?.offset, 0);
  assert.equal(extents[0]?.flags, 0, 'written data is data');
  assert.ok(extents.some((e) => e.flags & 1), 'the unwritten tail is a hole');
  await client.close();
  await assert.rejects(NbdClient.connect(address, { exportName: 'other' }), (err: { code: string }) => err.code === 'VMF_NBD_NO_EXPORT');
});

test('against nbdkit: with and without structured replies, trim and zeroes, the export list', async () => {
  const address = await nbdkit('memory', 'memory', '8M');
  const client = await NbdClient.connect(address);
  await client.write(MiB, Buffer.alloc(MiB, 0x5a), { fua: true });
  await client.writeZeroes(MiB, 4096);
  await client.trim(MiB + 4096, 4096);
  const back = await client.read(MiB, 3 * 4096);
  assert.equal(back[0], 0);
  assert.equal(back[2 * 4096], 0x5a);
  await client.close();

  const plain = await NbdClient.connect(await nbdkit('no-sr', '--no-sr', 'memory', '8M'));
  assert.equal(plain.export.structuredReplies, false);
  await plain.write(0, Buffer.alloc(4096, 7));
  assert.equal((await plain.read(0, 4096))[4095], 7);
  await plain.close();

  assert.deepEqual((await NbdClient.list(address)).map((e) => e.name), ['']);
});

test('probeNbdExport against the storage server on a unix socket: reachable and its size', async () => {
  const socket = join(dir, 'storage.sock');
  const storage = await StorageServer.start({ dataDir: join(dir, 'storage'), logger: pino({ level: 'silent' }), socket });
  cleanup.add('storage server', () => storage.close());
  await storage.volumes.create('shared', 4 * MiB);
  const info = await probeNbdExport({ type: 'unix', path: socket }, 'shared');
  assert.equal(info.size, 4 * MiB);
  assert.equal(info.readOnly, false);
  assert.equal(info.canMultiConn, true);
  for (let i = 0; i < 50 && storage.nbd.connections().length > 0; i++) await sleep(20);
  assert.deepEqual(storage.nbd.connections(), [], 'the probe disconnected');
  await assert.rejects(probeNbdExport({ type: 'unix', path: socket }, 'absent'), /has no export "absent": no export named "absent"/);
  assert.deepEqual((await NbdClient.list({ type: 'unix', path: socket })).map((e) => e.name), ['shared']);
});

test('errors: nobody listening, a server that never speaks, a server that hangs up mid-request', async () => {
  await assert.rejects(NbdClient.connect({ type: 'unix', path: join(dir, 'nobody.sock') }), (err: { code: string }) => err.code === 'VMF_UNREACHABLE');

  const silent: Server = createServer(() => undefined);
  await new Promise<void>((resolve) => silent.listen(join(dir, 'silent.sock'), resolve));
  cleanup.add('silent server', () => new Promise((resolve) => silent.close(resolve)));
  const started = Date.now();
  await assert.rejects(NbdClient.connect({ type: 'unix', path: join(dir, 'silent.sock') }, { timeoutMs: 300 }), (err: { code: string }) => err.code === 'VMF_TIMEOUT');
  assert.ok(Date.now() - started < 3000);
  const aborted = new AbortController();
  setTimeout(() => aborted.abort(), 100);
  await assert.rejects(NbdClient.connect({ type: 'unix', path: join(dir, 'silent.sock') }, { signal: aborted.signal }), (err: { code: string }) => err.code === 'VMF_ABORTED');

  // nbdkit's delay filter holds the read; killing the server fails it with VMF_NBD_CLOSED.
  const { child, path } = await startNbdkit('slow', ['--filter=delay', 'memory', '1M', 'rdelay=10'], 'ignore');
  cleanup.add('slow nbdkit', () => (child.exitCode === null ? child.kill('SIGKILL') : undefined));
  const client = await NbdClient.connect({ type: 'unix', path });
  const read = client.read(0, 4096);
  await sleep(200);
  child.kill('SIGKILL');
  await assert.rejects(read, (err: { code: string }) => err.code === 'VMF_NBD_CLOSED');
  await assert.rejects(client.flush(), (err: { code: string }) => err.code === 'VMF_NBD_CLOSED');
});

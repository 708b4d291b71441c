// Hostile and broken NBD input, byte by byte: each gets the protocol's answer
// (an error reply, or a clean disconnect where the protocol says so), and the
// server keeps serving everyone else.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { promisify } from 'node:util';
import { after, afterEach, before, test } from 'node:test';
import { RawNbdConnection, u32, u64 } from '../support/raw-nbd.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';

const execFile = promisify(execFileCallback);
const READ = 0;
const WRITE = 1;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const size = 8 * 1024 * 1024;
let storage: TestStorage;

before(async () => {
  storage = await startTestStorage();
  await storage.server.volumes.create('vol', size);
  await storage.server.volumes.create('ro', size, true);
});
after(() => storage.stop());

afterEach(async () => {
  // Whatever the last client did, a well-behaved client is still served.
  const { stdout } = await execFile('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 4k', '-c', 'read -P 0x77 0 4k', storage.uri('vol')]);
  assert.doesNotMatch(stdout, /failed/);
});

async function attached(exportName = 'vol'): Promise<RawNbdConnection> {
  const connection = await RawNbdConnection.open(storage.nbdPort);
  await connection.handshake(exportName);
  return connection;
}

test('a wrong greeting reply (unknown client flags) is disconnected', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(0xff00));
  assert.equal(await c.read(1), undefined, 'the server hung up');
});

test('a truncated handshake is dropped without disturbing the server', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(Buffer.from([0, 0]));
  c.close();
});

test('an option cut off mid-data, and a request cut off mid-header, only end their own connection', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(3));
  c.write(Buffer.concat([u64(0x49484156454f5054n), u32(7), u32(100), Buffer.alloc(10)]));
  c.close();
  const d = await attached();
  d.write(Buffer.alloc(10, 0x25));
  d.close();
  for (let i = 0; i < 50 && storage.server.nbd.connections().length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(storage.server.nbd.connections(), []);
  assert.deepEqual(storage.server.volumes.get('vol').attachments, []);
});

test('option data over the 64 KiB limit gets NBD_REP_ERR_TOO_BIG and the handshake goes on', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(3));
  c.write(Buffer.concat([u64(0x49484156454f5054n), u32(6), u32(100_000), Buffer.alloc(100_000)]));
  const reply = await c.read(20);
  assert.equal(reply?.readUInt32BE(12), 2 ** 31 + 9);
  await c.read(reply?.readUInt32BE(16) ?? 0);
  c.close();
});

test('an option without the IHAVEOPT magic is disconnected', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(3));
  c.write(Buffer.concat([u64(0x1234n), u32(7), u32(0)]));
  assert.equal(await c.read(1), undefined);
});

test('an unknown option gets NBD_REP_ERR_UNSUP and the handshake goes on', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(3));
  c.write(Buffer.concat([u64(0x49484156454f5054n), u32(99), u32(0)]));
  const reply = await c.read(20);
  assert.equal(reply?.readUInt32BE(12), 2 ** 31 + 1);
  const message = await c.read(reply?.readUInt32BE(16) ?? 0);
  assert.match(message?.toString() ?? '', /option 99 is not supported/);
  c.close();
});

test('an unknown export in GO gets NBD_REP_ERR_UNKNOWN naming it', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await assert.rejects(c.handshake('nope'), /option error 2147483654: no export named "nope"/);
  c.close();
});

test('an unknown command, a past-the-end read, an oversized read: EINVAL, connection still usable', async () => {
  const c = await attached();
  assert.equal(await c.request(42, 0n, 4096), EINVAL);
  assert.equal(await c.request(READ, BigInt(size - 1024), 4096), EINVAL);
  assert.equal(await c.request(READ, 0n, 64 * 1024 * 1024), EINVAL);
  assert.equal(await c.request(READ, 0n, 4096, { flags: 0x80 }), EINVAL, 'unknown flag');
  assert.equal(await c.request(READ, 0n, 4096), 0);
  c.close();
});

test('a write past the end gets ENOSPC; a write to a read-only export gets EPERM and changes nothing', async () => {
  const c = await attached();
  assert.equal(await c.request(WRITE, BigInt(size), 512, { payload: Buffer.alloc(512, 1) }), ENOSPC);
  c.close();
  const ro = await attached('ro');
  assert.equal(await ro.request(WRITE, 0n, 4096, { payload: Buffer.alloc(4096, 0x99) }), EPERM);
  ro.close();
  const { stdout } = await execFile('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 4k', storage.uri('ro')]);
  assert.doesNotMatch(stdout, /failed/);
});

test('a write larger than the advertised maximum is disconnected (its payload cannot be skipped safely)', async () => {
  const c = await attached();
  assert.equal(await c.request(WRITE, 0n, 64 * 1024 * 1024), undefined);
});

test('a request with a wrong magic is disconnected', async () => {
  const c = await attached();
  assert.equal(await c.request(READ, 0n, 4096, { magic: 0xdeadbeef }), undefined);
});

test('many clients flooding pipelined reads do not stop the server from answering others', async () => {
  const clients = await Promise.all(Array.from({ length: 8 }, () => attached()));
  for (const c of clients) {
    // 200 pipelined 1 MiB reads nobody reads the answers of: backpressure must hold them.
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt32BE(1024 * 1024, 24);
    c.write(Buffer.concat(Array.from({ length: 200 }, () => header)));
  }
  const { stdout } = await execFile('nbdinfo', ['--size', storage.uri('vol')]);
  assert.equal(stdout.trim(), String(size));
  for (const c of clients) c.close();
  assert.ok(process.memoryUsage().rss < 1024 * 1024 * 1024, `rss ${process.memoryUsage().rss}`);
});

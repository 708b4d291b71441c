// Hostile and broken NBD input, byte by byte: each gets the protocol's answer
// (an error reply, or a clean disconnect where the protocol says so), and the
// server keeps serving everyone else.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { promisify } from 'node:util';
import { after, afterEach, before, test } from 'node:test';
import { RawNbdConnection, u32, u64 } from '../support/raw-nbd.ts';
import { recordReliability } from '../support/reliability.ts';
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

/** A test of one bad input, recorded in the reliability tally with whether the server's answer held. */
function badInput(tried: string, answer: string, fn: () => Promise<void>): void {
  test(`${tried}: ${answer}`, async () => {
    try {
      await fn();
      recordReliability(import.meta.url, { kind: 'bad-input', target: 'NBD', tried, observed: `${answer}; a well-behaved client is still served`, ok: true });
    } catch (err) {
      recordReliability(import.meta.url, { kind: 'bad-input', target: 'NBD', tried, observed: `not as expected: ${(err as Error).message.split('\n')[0]}`, ok: false });
      throw err;
    }
  });
}

async function attached(exportName = 'vol'): Promise<RawNbdConnection> {
  const connection = await RawNbdConnection.open(storage.nbdPort);
  await connection.handshake(exportName);
  return connection;
}

badInput('unknown client flags in the greeting reply', 'disconnected, as the protocol says', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(0xff00));
  assert.equal(await c.read(1), undefined, 'the server hung up');
});

badInput('a handshake cut off after 2 bytes of client flags', 'connection dropped, server undisturbed', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(Buffer.from([0, 0]));
  c.close();
});

badInput('an option cut off mid-data, and a request cut off mid-header', 'only their own connection ends; no connection or attachment left', async () => {
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

badInput('100,000 bytes of option data (limit 64 KiB)', 'NBD_REP_ERR_TOO_BIG and the handshake goes on', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(3));
  c.write(Buffer.concat([u64(0x49484156454f5054n), u32(6), u32(100_000), Buffer.alloc(100_000)]));
  const reply = await c.read(20);
  assert.equal(reply?.readUInt32BE(12), 2 ** 31 + 9);
  await c.read(reply?.readUInt32BE(16) ?? 0);
  c.close();
});

badInput('an option without the IHAVEOPT magic', 'disconnected', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await c.read(18);
  c.write(u32(3));
  c.write(Buffer.concat([u64(0x1234n), u32(7), u32(0)]));
  assert.equal(await c.read(1), undefined);
});

badInput('unknown option 99', 'NBD_REP_ERR_UNSUP "option 99 is not supported", handshake goes on', async () => {
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

badInput('NBD_OPT_GO for an unknown export', 'NBD_REP_ERR_UNKNOWN naming the export', async () => {
  const c = await RawNbdConnection.open(storage.nbdPort);
  await assert.rejects(c.handshake('nope'), /option error 2147483654: no export named "nope"/);
  c.close();
});

badInput('unknown command, past-the-end read, 64 MiB read, unknown flag', 'EINVAL for each, the connection stays usable', async () => {
  const c = await attached();
  assert.equal(await c.request(42, 0n, 4096), EINVAL);
  assert.equal(await c.request(READ, BigInt(size - 1024), 4096), EINVAL);
  assert.equal(await c.request(READ, 0n, 64 * 1024 * 1024), EINVAL);
  assert.equal(await c.request(READ, 0n, 4096, { flags: 0x80 }), EINVAL, 'unknown flag');
  assert.equal(await c.request(READ, 0n, 4096), 0);
  c.close();
});

badInput('a write past the end; a write to a read-only export', 'ENOSPC; EPERM with the volume unchanged', async () => {
  const c = await attached();
  assert.equal(await c.request(WRITE, BigInt(size), 512, { payload: Buffer.alloc(512, 1) }), ENOSPC);
  c.close();
  const ro = await attached('ro');
  assert.equal(await ro.request(WRITE, 0n, 4096, { payload: Buffer.alloc(4096, 0x99) }), EPERM);
  ro.close();
  const { stdout } = await execFile('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 4k', storage.uri('ro')]);
  assert.doesNotMatch(stdout, /failed/);
});

badInput('a 64 MiB write (maximum 32 MiB)', 'disconnected (its payload cannot be skipped safely)', async () => {
  const c = await attached();
  assert.equal(await c.request(WRITE, 0n, 64 * 1024 * 1024), undefined);
});

badInput('a request with a wrong magic', 'disconnected', async () => {
  const c = await attached();
  assert.equal(await c.request(READ, 0n, 4096, { magic: 0xdeadbeef }), undefined);
});

badInput('8 clients each pipelining 200 × 1 MiB reads without reading replies', 'backpressure holds them; nbdinfo is answered meanwhile', async () => {
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

// The server's reused read buffers: the pool on its own (a buffer comes back
// once, only from the pool, within its bound), then over a real server and
// real sockets, where a client that reads its replies late must still get
// each block's own bytes: a buffer used again before its reply had left would
// send another request's data.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { BufferPool } from '../../src/nbd/buffer-pool.ts';
import { NbdServer, defaultLimits } from '../../src/nbd/server.ts';
import { MemoryBackend, MemoryExports } from '../support/memory-export.ts';
import { RawNbdConnection } from '../support/raw-nbd.ts';
import { closeAfterEachTest } from '../support/nbd-teardown.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const { raws, serving } = closeAfterEachTest();

test('a buffer given back is handed out again; given back twice, or never lent, it is not', () => {
  const pool = new BufferPool(4 * MiB);
  const first = pool.take(MiB);
  assert.equal(first.length, MiB);
  pool.give(first);
  pool.give(first);
  assert.equal(pool.freeBytes, MiB, 'a second give of the same buffer is ignored');
  const again = pool.take(MiB);
  assert.equal(again.buffer, first.buffer, 'the free buffer is used again');
  const other = pool.take(MiB);
  assert.notEqual(other.buffer, first.buffer, 'a buffer given back twice is not handed to two requests');
  pool.give(Buffer.alloc(MiB));
  assert.equal(pool.freeBytes, 0, 'a buffer the pool did not lend is not kept');
});

test('a request gets exactly its length, on a buffer of its power-of-two size that serves the next request of that size', () => {
  const pool = new BufferPool(4 * MiB);
  const odd = pool.take(516 * KiB);
  assert.equal(odd.length, 516 * KiB);
  assert.equal(odd.buffer.byteLength, MiB);
  pool.give(odd);
  assert.equal(pool.take(600 * KiB).buffer, odd.buffer);
});

test('free buffers stay within the bound: sizes no longer asked for make room, and the rest are let go', () => {
  const pool = new BufferPool(2 * MiB);
  const small = [pool.take(64 * KiB), pool.take(64 * KiB)];
  for (const buffer of small) pool.give(buffer);
  assert.equal(pool.freeBytes, 128 * KiB);
  const large = [pool.take(MiB), pool.take(MiB), pool.take(MiB)];
  for (const buffer of large) pool.give(buffer);
  assert.equal(pool.freeBytes, 2 * MiB, 'two 1 MiB buffers kept, the 64 KiB ones dropped for them, the third let go');
  const huge = pool.take(8 * MiB);
  assert.equal(huge.length, 8 * MiB);
  pool.give(huge);
  assert.equal(pool.freeBytes, 2 * MiB, 'a request larger than the pool serves has a buffer of its own, not kept');
});

test('a client that reads its replies late gets each block\'s own bytes: a read buffer is used again only once its reply has left', async () => {
  const block = 256 * KiB;
  const blocks = 32;
  const backend = new MemoryBackend(blocks * block);
  for (let i = 0; i < blocks; i++) backend.data.fill(i + 1, i * block, (i + 1) * block);
  const exports = new MemoryExports();
  exports.backends.set('disk', backend);
  // Few requests at a time, so that later reads run while the replies of earlier ones still wait to be sent.
  const running = serving(new NbdServer(exports, pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }), { ...defaultLimits, maxInFlightRequests: 4 }));
  const port = await running.listenTcp('127.0.0.1', 0);
  const raw = await RawNbdConnection.open(port);
  raws.push(raw);
  await raw.handshake('disk');

  // Three passes over the blocks without reading a reply: 24 MiB, more than the kernel's socket buffers hold,
  // so most replies wait in the server while later reads take buffers from its pool.
  raw.socket.pause();
  const requests: Buffer[] = [];
  for (let n = 0; n < 3 * blocks; n++) {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeBigUInt64BE(BigInt(n), 8);
    header.writeBigUInt64BE(BigInt((n % blocks) * block), 16);
    header.writeUInt32BE(block, 24);
    requests.push(header);
  }
  raw.write(Buffer.concat(requests));
  await new Promise((resolve) => setTimeout(resolve, 500));
  raw.socket.resume();

  for (let i = 0; i < 3 * blocks; i++) {
    const reply = await raw.read(16, 10_000);
    assert.ok(reply, `reply ${i} arrived`);
    assert.equal(reply.readUInt32BE(4), 0);
    const n = Number(reply.readBigUInt64BE(8));
    const data = await raw.read(block, 10_000);
    assert.ok(data);
    const expected = (n % blocks) + 1;
    assert.ok(data.every((byte) => byte === expected), `request ${n} (block ${n % blocks}) got another block's bytes (first byte ${data[0]}, expected ${expected})`);
  }
});

// A server's sockets read into one reused buffer (Node's onread), over real
// sockets: every byte reaches the reader as sent whatever the split of the
// socket reads, a client that floods the server cannot grow what is staged,
// and through the NBD server write payloads land in memory that is used again,
// only once the backend has written the payload before.
import assert from 'node:assert/strict';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { afterEach, test } from 'node:test';
import pino from 'pino';
import { BufferPool } from '../../src/nbd/buffer-pool.ts';
import { ReusedBufferReader } from '../../src/nbd/reused-buffer-reader.ts';
import { NbdServer, defaultLimits } from '../../src/nbd/server.ts';
import { ConnectionClosedError } from '../../src/nbd/socket-reader.ts';
import { MemoryBackend, MemoryExports } from '../support/memory-export.ts';
import { RawNbdConnection } from '../support/raw-nbd.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const cleanups: (() => unknown)[] = [];

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A listener whose accepted socket is adopted by a fresh reader; resolves with the reader and the client's socket. */
async function pair(highWaterBytes: number, pool = new BufferPool(8 * MiB)): Promise<{ reader: ReusedBufferReader; client: Socket; served: Socket }> {
  const reader = new ReusedBufferReader(highWaterBytes, pool);
  const clients: Socket[] = [];
  const adopted = new Promise<Socket>((resolve, reject) => {
    const server: Server = createServer({ pauseOnConnect: true }, (accepted) => {
      const socket = reader.adopt(accepted);
      if (socket) resolve(socket);
      else reject(new Error('this Node offers no way to adopt an accepted socket'));
    });
    cleanups.push(() => new Promise((done) => server.close(done)));
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const client = connect({ host: '127.0.0.1', port: typeof address === 'object' && address ? address.port : 0 });
      client.on('error', () => undefined);
      cleanups.push(() => client.destroy());
      clients.push(client);
    });
  });
  const served = await adopted;
  cleanups.push(() => served.destroy());
  return { reader, client: clients[0] as Socket, served };
}

function pattern(length: number, seed: number): Buffer {
  const data = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) data[i] = (i * 31 + seed) & 0xff;
  return data;
}

test('every byte arrives as sent, whether it was staged before it was asked for or read straight into the target', async () => {
  const { reader, client } = await pair(256 * KiB);
  const header = pattern(28, 1);
  const payload = pattern(3 * MiB + 5, 2);
  const tail = pattern(11, 3);
  // Sent in pieces that cut across the header, the payload and the reads of the server.
  const stream = Buffer.concat([header, payload, tail]);
  for (let at = 0; at < stream.length; at += 100_003) client.write(stream.subarray(at, at + 100_003));

  assert.ok((await reader.read(28)).equals(header));
  // Let the payload's first bytes be staged before the payload is asked for.
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.ok(reader.buffered > 0, 'bytes that arrived before being asked for are staged');
  const [chunk, ...more] = await reader.readChunks(payload.length);
  assert.equal(more.length, 0, 'a payload is one buffer');
  assert.ok(chunk?.equals(payload), 'the payload is the bytes sent');
  assert.ok((reader.tryRead(11) ?? (await reader.read(11))).equals(tail));
});

test('a client that sends more than the server reads is held back: what is staged stays near the high-water mark', async () => {
  const highWater = 128 * KiB;
  const { reader, client } = await pair(highWater);
  const sent = pattern(16 * MiB, 4);
  client.write(sent);
  await new Promise((resolve) => setTimeout(resolve, 300));
  // One socket read (64 KiB) may land past the mark before reading stops.
  assert.ok(reader.buffered <= highWater + 64 * KiB, `${reader.buffered} bytes staged with a high-water mark of ${highWater}`);
  assert.ok(client.writableLength > 0 || client.bytesWritten < sent.length, 'the rest waits on the client side');
  for (let at = 0; at < sent.length; at += MiB) {
    const [chunk] = await reader.readChunks(MiB);
    assert.ok(chunk?.equals(sent.subarray(at, at + MiB)), `megabyte ${at / MiB} arrived intact after the pause`);
  }
});

test('a read the client hangs up on rejects as a closed connection, and so does every later one', async () => {
  const { reader, client } = await pair(64 * KiB);
  client.end(pattern(10, 5));
  await assert.rejects(reader.read(20), ConnectionClosedError);
  await assert.rejects(reader.readChunks(4), ConnectionClosedError);
});

test('through the server, 1 MiB writes land intact in reused memory, and a payload\'s memory serves another only once written', async () => {
  const writes = 48;
  const backend = new MemoryBackend(16 * MiB);
  const payloadMemory = new Set<ArrayBufferLike>();
  // Each write is held in the backend for a while: were its payload's buffer used again before the write ended,
  // a later payload would overwrite it and the disk would hold the later bytes.
  backend.hook = (op) => (op === 'write' ? new Promise((resolve) => setTimeout(resolve, 20)) : undefined);
  const write = backend.write.bind(backend);
  backend.write = (offset, data, fua) => {
    for (const piece of data) payloadMemory.add(piece.buffer);
    return write(offset, data, fua);
  };
  const exports = new MemoryExports();
  exports.backends.set('disk', backend);
  const server = new NbdServer(exports, pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }), { ...defaultLimits, maxInFlightRequests: 8 });
  cleanups.push(() => server.close(1_000));
  const raw = await RawNbdConnection.open(await server.listenTcp('127.0.0.1', 0));
  cleanups.push(() => raw.close());
  await raw.handshake('disk');

  const requests: Buffer[] = [];
  for (let n = 0; n < writes; n++) {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt16BE(1, 6);
    header.writeBigUInt64BE(BigInt(n), 8);
    header.writeBigUInt64BE(BigInt((n % 16) * MiB), 16);
    header.writeUInt32BE(MiB, 24);
    requests.push(header, Buffer.alloc(MiB, n + 1));
  }
  raw.write(Buffer.concat(requests));
  for (let n = 0; n < writes; n++) {
    const reply = await raw.read(16, 10_000);
    assert.equal(reply?.readUInt32BE(4), 0, `write ${n} succeeded`);
  }
  for (let block = 0; block < 16; block++) {
    const expected = 32 + block + 1;
    const data = backend.data.subarray(block * MiB, (block + 1) * MiB);
    assert.ok(data.every((byte) => byte === expected), `block ${block} holds the last write to it (first byte ${data[0]}, expected ${expected})`);
  }
  // At most 8 writes in flight, and the budget; fresh memory per socket read would be hundreds of buffers.
  assert.ok(payloadMemory.size <= 16, `${writes} payloads arrived in ${payloadMemory.size} buffers`);
});

test('a read cancelled while the socket reads straight into its buffer: that buffer goes to no other request', async () => {
  const pool = new BufferPool(8 * MiB);
  const { reader, client } = await pair(256 * KiB, pool);
  const settle = (): Promise<unknown> => new Promise((resolve) => setTimeout(resolve, 100));
  client.write(pattern(200 * KiB, 6));
  await settle();
  const pending = reader.readChunks(MiB);
  // After one more read, the socket reads into the waiting payload's buffer itself.
  client.write(pattern(100 * KiB, 7));
  await settle();
  reader.cancel(new Error('the server is shutting down'));
  await assert.rejects(pending, /shutting down/);
  const other = pool.take(MiB).fill(0xee);
  client.write(pattern(300 * KiB, 8));
  await settle();
  assert.ok(other.every((byte) => byte === 0xee), 'bytes the client sent after the cancel did not land in another request\'s buffer');
});

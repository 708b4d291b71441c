// The server-wide NBD memory budget: the accounting on its own (the floor of
// one request per connection, first-come order, cancel and close), then over a
// real server and real sockets, where one connection holds the whole budget and
// another must still be served, and everything held comes back when it leaves.
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { MemoryBudget } from '../../src/nbd/memory-budget.ts';
import pino from 'pino';
import { NbdClient } from '../../src/nbd/client.ts';
import { NbdServer, defaultLimits } from '../../src/nbd/server.ts';
import { MemoryBackend, MemoryExports } from '../support/memory-export.ts';
import { RawNbdConnection, u32, u64 } from '../support/raw-nbd.ts';
import { closeAfterEachTest } from '../support/nbd-teardown.ts';

const MiB = 1024 * 1024;
const { raws, serving } = closeAfterEachTest();

/** An NBD server over memory exports with a memory budget of `budgetMiB`, on a free loopback port. */
async function serve(backends: Record<string, MemoryBackend>, budgetMiB: number): Promise<{ server: NbdServer; port: number; exports: MemoryExports }> {
  const exports = new MemoryExports();
  for (const [name, backend] of Object.entries(backends)) exports.backends.set(name, backend);
  const server = new NbdServer(exports, pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }), { ...defaultLimits, memoryBudgetBytes: budgetMiB * MiB });
  serving(server);
  return { server, port: await server.listenTcp('127.0.0.1', 0), exports };
}

/** Whether `promise` has settled after the microtasks and timers now queued have run. */
async function settled(promise: Promise<unknown>): Promise<boolean> {
  let done = false;
  promise.then(
    () => (done = true),
    () => (done = true),
  );
  await sleep(10);
  return done;
}

async function until(what: string, condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(10);
  }
}

test('a connection holding nothing always gets one request, past the budget; others wait their turn in order', async () => {
  const budget = new MemoryBudget(4 * MiB);
  const hog = budget.account();
  const first = budget.account();
  const second = budget.account();
  await hog.acquire(3 * MiB);
  await hog.acquire(MiB);
  const hogMore = hog.acquire(2 * MiB);
  assert.equal(await settled(hogMore), false, 'a connection over budget waits');

  // Nothing held: the floor lets each of them run one request, though the budget is spent.
  await first.acquire(2 * MiB);
  await second.acquire(MiB);
  assert.equal(budget.usedBytes, 7 * MiB);
  const firstMore = first.acquire(MiB);
  assert.equal(budget.waitingConnections, 2);

  hog.release(3 * MiB);
  second.release(MiB);
  assert.equal(budget.usedBytes, 3 * MiB);
  assert.equal(await settled(firstMore), false, 'a small request that would fit does not pass the larger one that waited first');
  assert.equal(await settled(hogMore), false);

  first.release(2 * MiB);
  assert.equal(await settled(hogMore), true, 'the first waiter, once it fits');
  assert.equal(await settled(firstMore), true, 'a connection that gave everything back is let through at once');
  assert.equal(budget.waitingConnections, 0);

  for (const account of [hog, first, second]) account.close();
  assert.equal(budget.usedBytes, 0, 'closing gives back everything each connection held');
});

test('tryAcquire takes at once only what acquire would grant without waiting, and takes nothing otherwise', async () => {
  const budget = new MemoryBudget(4 * MiB);
  const hog = budget.account();
  const other = budget.account();
  assert.equal(hog.tryAcquire(3 * MiB), true);
  assert.equal(hog.tryAcquire(2 * MiB), false, 'past the budget, for a connection that holds some');
  assert.equal(hog.heldBytes, 3 * MiB, 'a refused try takes nothing');
  const hogMore = hog.acquire(2 * MiB);
  assert.equal(other.tryAcquire(2 * MiB), true, 'the floor: a connection holding nothing gets one request');
  assert.equal(other.tryAcquire(MiB), false, 'a newcomer that would fit still queues behind the earlier waiter');
  assert.equal(hog.tryAcquire(MiB), false, 'not while its own acquire waits');
  other.release(2 * MiB);
  hog.release(3 * MiB);
  assert.equal(await settled(hogMore), true);
  other.cancel(new Error('gone'));
  assert.equal(other.tryAcquire(MiB), false, 'not once cancelled');
  for (const account of [hog, other]) account.close();
  assert.equal(budget.usedBytes, 0);
});

test('a wait that is cancelled rejects, leaves the queue, and does not hold up those behind it', async () => {
  const budget = new MemoryBudget(2 * MiB);
  const a = budget.account();
  const b = budget.account();
  await a.acquire(2 * MiB);
  await b.acquire(MiB);
  const aMore = a.acquire(2 * MiB);
  const bMore = b.acquire(MiB);
  a.cancel(new Error('client went away'));
  await assert.rejects(aMore, /client went away/);
  await assert.rejects(a.acquire(1), /client went away/, 'a cancelled account takes nothing more');
  assert.equal(await settled(bMore), false, 'still over budget: a still holds 2 MiB');
  a.close();
  assert.equal(await settled(bMore), true);
  assert.equal(budget.usedBytes, 2 * MiB);
  b.close();
  assert.equal(budget.usedBytes, 0);
});

/** Sends `count` READs of `length` bytes without waiting for replies. */
function pipelineReads(raw: RawNbdConnection, count: number, length: number): void {
  const requests = Array.from({ length: count }, (_, i) => {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeBigUInt64BE(BigInt(i), 8);
    header.writeBigUInt64BE(BigInt((i * length) % (8 * MiB)), 16);
    header.writeUInt32BE(length, 24);
    return header;
  });
  raw.write(Buffer.concat(requests));
}

/** A client that must be served while another holds the budget: writes, reads back, compares. */
async function wellBehavedRoundTrip(port: number): Promise<void> {
  const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port }, { exportName: 'good', timeoutMs: 10_000 });
  try {
    const data = Buffer.alloc(3 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32BE(i, i);
    // Pipelined: with the budget spent, the server takes them one at a time, but takes them.
    await Promise.all([0, 1, 2].map((k) => client.write(k * MiB, data.subarray(k * MiB, (k + 1) * MiB))));
    await client.flush();
    const back = await Promise.all([0, 1, 2].map((k) => client.read(k * MiB, MiB)));
    assert.ok(Buffer.concat(back).equals(data), 'the well-behaved client read back what it wrote');
  } finally {
    await client.close();
  }
}

test('reads held in the backend spend the budget: that connection stops taking requests, another is still served', async () => {
  const flood = new MemoryBackend(8 * MiB);
  flood.data.fill(0x5a);
  let releaseReads!: () => void;
  const readsHeld = new Promise<void>((resolve) => (releaseReads = resolve));
  flood.hook = (op) => (op === 'read' ? readsHeld : undefined);
  const { server, port } = await serve({ flood, good: new MemoryBackend(8 * MiB) }, 4);

  const hog = await RawNbdConnection.open(port);
  raws.push(hog);
  await hog.handshake('flood');
  pipelineReads(hog, 16, MiB);
  await until('the hog waits for budget', () => server.memoryBudget().waitingConnections === 1);
  assert.equal(flood.running, 4, 'only as many 1 MiB reads run as fit in the 4 MiB budget');
  assert.equal(server.memoryBudget().usedBytes, 4 * MiB);

  await wellBehavedRoundTrip(port);
  assert.equal(flood.running, 4, 'the hog took nothing more meanwhile');

  // Let the hog's reads finish: every one of its 16 requests is answered with the right bytes.
  releaseReads();
  for (let i = 0; i < 16; i++) {
    const reply = await hog.read(16 + MiB, 10_000);
    assert.ok(reply, `reply ${i} of the hog's 16 reads`);
    assert.equal(reply.readUInt32BE(4), 0);
    assert.ok(reply.subarray(16).every((b) => b === 0x5a));
  }
  await until('the hog holds nothing once its replies are read', () => server.memoryBudget().usedBytes === 0);
});

test('replies a client never reads keep the budget spent until it goes; then every byte comes back', async () => {
  const { server, port } = await serve({ flood: new MemoryBackend(8 * MiB), good: new MemoryBackend(8 * MiB) }, 8);

  const hog = await RawNbdConnection.open(port);
  raws.push(hog);
  await hog.handshake('flood');
  // It stops reading: the kernel's buffers fill, then the server's queued replies, then the budget.
  hog.socket.pause();
  pipelineReads(hog, 256, MiB);
  await until('the hog waits for budget', () => server.memoryBudget().waitingConnections === 1, 30_000);
  assert.ok(server.memoryBudget().usedBytes <= 8 * MiB, `${server.memoryBudget().usedBytes} bytes held for a budget of ${8 * MiB}`);

  await wellBehavedRoundTrip(port);

  hog.close();
  await until('everything the hog held is given back', () => server.memoryBudget().usedBytes === 0 && server.connections().length === 0);
  assert.equal(server.memoryBudget().waitingConnections, 0);
});

test('waits for budget end when the server shuts down, and everything held comes back', async () => {
  const flood = new MemoryBackend(8 * MiB);
  let releaseBackend!: () => void;
  const backendHeld = new Promise<void>((resolve) => (releaseBackend = resolve));
  flood.hook = () => backendHeld;
  const { server, port, exports } = await serve({ flood }, 2);

  // Two 1 MiB writes held in the backend spend the budget; the third waits for it, its payload unread.
  const writer = await RawNbdConnection.open(port);
  raws.push(writer);
  await writer.handshake('flood');
  const write = (i: number): Buffer => Buffer.concat([u32(0x25609513), u32(1), u64(BigInt(i)), u64(BigInt(i * MiB)), u32(MiB), Buffer.alloc(MiB, i)]);
  writer.write(Buffer.concat([write(0), write(1), write(2)]));
  await until('the third write waits for budget', () => server.memoryBudget().waitingConnections === 1);
  // Another client gets its one read past the budget, and waits for its second.
  const reader = await RawNbdConnection.open(port);
  raws.push(reader);
  await reader.handshake('flood');
  pipelineReads(reader, 3, MiB);
  await until('the reader waits too', () => server.memoryBudget().waitingConnections === 2);
  assert.equal(server.memoryBudget().usedBytes, 3 * MiB);

  const closing = server.close(5_000);
  serving(undefined);
  await until('shutting down ends both waits, though the budget is still spent', () => server.memoryBudget().waitingConnections === 0);
  releaseBackend();
  await closing;
  assert.deepEqual(exports.attached, []);
  assert.equal(server.memoryBudget().usedBytes, 0);
  assert.equal(flood.data[MiB], 1, 'the writes taken before the shutdown completed');
  assert.equal(flood.data[2 * MiB], 0, 'the write still waiting for budget was never taken');
});

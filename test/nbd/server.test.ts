// The NBD server over memory exports, apart from any storage: concurrency,
// reply order, in-flight bounds, the validator and the errno mapping, driven
// by vmferry's client and by real clients.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { promisify } from 'node:util';
import { afterEach, test } from 'node:test';
import { NbdClient, NbdRequestError } from '../../src/nbd/client.ts';
import { NbdBackendError } from '../../src/nbd/backend.ts';
import { NbdErrno } from '../../src/nbd/constants.ts';
import type { NbdServer } from '../../src/nbd/server.ts';
import { MemoryBackend, startMemoryServer } from '../support/memory-export.ts';

const execFile = promisify(execFileCallback);
const MiB = 1024 * 1024;
let running: NbdServer | undefined;

afterEach(async () => {
  await running?.close();
  running = undefined;
});

async function serve(backends: Record<string, MemoryBackend>, limits = {}): Promise<number> {
  const { server, port } = await startMemoryServer(backends, limits);
  running = server;
  return port;
}

const at = (port: number) => ({ type: 'inet' as const, host: '127.0.0.1', port });

test('pipelined requests run concurrently and their replies come back out of order', async () => {
  const backend = new MemoryBackend(MiB);
  const port = await serve({ mem: backend });
  let releaseFirst!: () => void;
  const firstHeld = new Promise<void>((resolve) => (releaseFirst = resolve));
  backend.hook = (op, offset) => (op === 'read' && offset === 0 ? firstHeld : undefined);
  const client = await NbdClient.connect(at(port), { exportName: 'mem' });
  const order: string[] = [];
  const first = client.read(0, 4096).then(() => order.push('first'));
  const second = client.read(8192, 4096).then(() => order.push('second'));
  await second;
  assert.deepEqual(order, ['second'], 'the later request was answered while the earlier one was still running');
  releaseFirst();
  await first;
  assert.deepEqual(order, ['second', 'first']);
  await client.close();
});

test('requests in flight per connection are bounded; the rest wait in the socket', async () => {
  const backend = new MemoryBackend(4 * MiB);
  const port = await serve({ mem: backend }, { maxInFlightRequests: 4 });
  backend.hook = () => new Promise((resolve) => setTimeout(resolve, 5));
  const client = await NbdClient.connect(at(port), { exportName: 'mem' });
  await Promise.all(Array.from({ length: 64 }, (_, i) => client.write(i * 4096, Buffer.alloc(4096, i))));
  assert.equal(backend.maxRunning, 4);
  const data = await client.read(0, 64 * 4096);
  for (let i = 0; i < 64; i++) assert.equal(data[i * 4096], i);
  await client.close();
});

test('writes from two connections are both visible, and a flush on either covers them (CAN_MULTI_CONN)', async () => {
  const port = await serve({ mem: new MemoryBackend(MiB) });
  const [a, b] = await Promise.all([NbdClient.connect(at(port), { exportName: 'mem' }), NbdClient.connect(at(port), { exportName: 'mem' })]);
  assert.equal(a.export.canMultiConn, true);
  await Promise.all([a.write(0, Buffer.alloc(4096, 0xaa)), b.write(4096, Buffer.alloc(4096, 0xbb))]);
  await a.flush();
  assert.equal((await b.read(0, 1))[0], 0xaa);
  assert.equal((await a.read(4096, 1))[0], 0xbb);
  await Promise.all([a.close(), b.close()]);
});

test('the validator answers before the backend sees anything: past the end, too large, read-only, no meta context', async () => {
  const backend = new MemoryBackend(MiB);
  const ro = new MemoryBackend(MiB, true);
  const port = await serve({ mem: backend, ro }, { maximum: 256 * 1024 });
  const client = await NbdClient.connect(at(port), { exportName: 'mem' });
  assert.deepEqual(client.export.blockSize, { minimum: 1, preferred: 4096, maximum: 256 * 1024 });
  const seen: string[] = [];
  backend.hook = (op) => void seen.push(op);
  await assert.rejects(client.read(MiB - 512, 1024), (err: NbdRequestError) => err.errno === NbdErrno.EINVAL && /past the end/.test(err.message));
  await assert.rejects(client.write(MiB, Buffer.alloc(512)), (err: NbdRequestError) => err.errno === NbdErrno.ENOSPC);
  await assert.rejects(client.trim(MiB - 512, 1024), (err: NbdRequestError) => err.errno === NbdErrno.EINVAL);
  assert.deepEqual(seen, []);
  // The client splits what is larger than the advertised maximum, so this works.
  assert.equal((await client.read(0, MiB)).length, MiB);
  await client.close();

  const roClient = await NbdClient.connect(at(port), { exportName: 'ro' });
  assert.equal(roClient.export.readOnly, true);
  await assert.rejects(roClient.write(0, Buffer.alloc(512, 1)), (err: NbdRequestError) => err.code === 'VMF_NBD_REQUEST' && err.errno === NbdErrno.EPERM);
  await assert.rejects(roClient.writeZeroes(0, 512), (err: NbdRequestError) => err.errno === NbdErrno.EPERM);
  await roClient.close();
  assert.equal(ro.data.every((b) => b === 0), true);

  const simple = await NbdClient.connect(at(port), { exportName: 'mem', structuredReplies: false });
  assert.deepEqual(simple.export.metaContexts, []);
  await assert.rejects(simple.blockStatus(0, 4096), /did not agree to the base:allocation/);
  await simple.close();
});

test('backend failures reach the client as the mapped NBD errno, and the connection carries on', async () => {
  const backend = new MemoryBackend(MiB);
  const port = await serve({ mem: backend });
  const client = await NbdClient.connect(at(port), { exportName: 'mem' });
  backend.hook = (op, offset) => {
    if (offset === 0 && op === 'write') throw Object.assign(new Error('no space left'), { code: 'ENOSPC' });
    if (offset === 4096 && op === 'write') throw new Error('something odd');
    if (offset === 8192 && op === 'read') throw new NbdBackendError(NbdErrno.EOVERFLOW, 'too far');
  };
  await assert.rejects(client.write(0, Buffer.alloc(512)), (err: NbdRequestError) => err.errno === NbdErrno.ENOSPC && /ENOSPC \(no space left\)/.test(err.message));
  await assert.rejects(client.write(4096, Buffer.alloc(512)), (err: NbdRequestError) => err.errno === NbdErrno.EIO);
  await assert.rejects(client.read(8192, 512), (err: NbdRequestError) => err.errno === NbdErrno.EOVERFLOW);
  await client.write(12288, Buffer.alloc(512, 9));
  assert.equal((await client.read(12288, 1))[0], 9);
  await client.close();
});

test('base:allocation over the memory export, seen by our client and by nbdinfo --map', async () => {
  const backend = new MemoryBackend(MiB);
  backend.data.fill(1, 8192, 12288);
  const port = await serve({ mem: backend });
  const client = await NbdClient.connect(at(port), { exportName: 'mem' });
  assert.deepEqual(await client.blockStatus(0, 64 * 1024), [
    { offset: 0, length: 8192, flags: 3 },
    { offset: 8192, length: 4096, flags: 0 },
    { offset: 12288, length: 64 * 1024 - 12288, flags: 3 },
  ]);
  assert.deepEqual(await client.blockStatus(0, 64 * 1024, { reqOne: true }), [{ offset: 0, length: 8192, flags: 3 }]);
  await client.close();
  const { stdout } = await execFile('nbdinfo', ['--map', `nbd://127.0.0.1:${port}/mem`]);
  assert.match(stdout, /^\s*8192\s+4096\s+0\s+data$/m);
});

test('closing the server drains requests in flight before the connections end', async () => {
  const backend = new MemoryBackend(MiB);
  const port = await serve({ mem: backend });
  const client = await NbdClient.connect(at(port), { exportName: 'mem' });
  backend.hook = () => new Promise((resolve) => setTimeout(resolve, 100));
  const write = client.write(0, Buffer.alloc(4096, 5));
  await new Promise((resolve) => setTimeout(resolve, 20));
  const closing = running?.close();
  running = undefined;
  await write;
  await closing;
  assert.equal(backend.data[0], 5);
  await assert.rejects(client.read(0, 1), (err: { code: string }) => err.code === 'VMF_NBD_CLOSED');
  client.destroy();
});

/**
 * Nagle's algorithm turned off on a QEMU NBD server's sockets from outside (src/qemu/socket-nodelay.ts), on a real
 * qemu-nbd (QEMU's own NBD server code) over loopback TCP.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import test from 'node:test';
import { setNoDelay } from '../../src/qemu/socket-nodelay.ts';
import { findFreePort } from '../../src/util/ports.ts';
import { runProgram } from '../../src/util/run.ts';
import { tcpSocketsOn } from '../support/tcp-nodelay.ts';
import { makeTempDir } from '../support/temp.ts';

async function connected(port: number): Promise<Socket> {
  const socket = connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  return socket;
}

test('an NBD server QEMU started with Nagle on: set off from outside, held by its listener and every connection accepted after', async (t) => {
  const dir = await makeTempDir('socket-nodelay');
  t.after(() => dir.remove());
  const image = join(dir.path, 'disk.qcow2');
  await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']);
  const port = await findFreePort('127.0.0.1');
  const server = spawn('qemu-nbd', ['--format=qcow2', '--shared=8', '--persistent', '--bind=127.0.0.1', `--port=${port}`, '--export-name=disk', image], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => server.once('exit', () => resolve()));
  const clients: Socket[] = [];
  t.after(async () => {
    for (const client of clients) client.destroy();
    server.kill('SIGTERM');
    await exited;
  });
  const pid = server.pid as number;
  for (let i = 0; i < 100 && (await tcpSocketsOn(pid, port)).length === 0; i++) await sleep(50);

  clients.push(await connected(port));
  await sleep(100);
  const before = await tcpSocketsOn(pid, port);
  assert.deepEqual(before.map((s) => s.noDelay), [false, false], `QEMU's own default, listener and the connection it accepted: ${JSON.stringify(before)}`);

  assert.equal(await setNoDelay(pid, port), 2);
  clients.push(await connected(port));
  await sleep(100);
  const after = await tcpSocketsOn(pid, port);
  assert.equal(after.length, 3, JSON.stringify(after));
  assert.ok(after.every((s) => s.noDelay), `every socket on the port: ${JSON.stringify(after)}`);
  // A real NBD client still negotiates and reads through it.
  const info = JSON.parse(await runProgram('qemu-img', ['info', '--output=json', `nbd://127.0.0.1:${port}/disk`])) as { 'virtual-size': number };
  assert.equal(info['virtual-size'], 64 * 1024 * 1024);
});

test('setting Nagle off where it cannot be done rejects with the cause, and nothing else changes', async () => {
  const gone = spawn('true');
  await new Promise((resolve) => gone.once('exit', resolve));
  await assert.rejects(setNoDelay(gone.pid as number, 10809), /port 10809 of process \d+: pidfd_open\(\d+\): No such process/);
  await assert.rejects(setNoDelay(process.pid, 0), /setNoDelay\(pid, port\): a process id and a TCP port/);
  // Our own process has nothing on a port nobody bound: none set.
  assert.equal(await setNoDelay(process.pid, await findFreePort('127.0.0.1')), 0);
});

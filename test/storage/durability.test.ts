// The storage server as users run it (the real CLI in its own process):
// flushed data survives a restart and a kill -9, and the catalog with it.
import assert from 'node:assert/strict';
import { execFile as execFileCallback, spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { findFreePort } from '../../src/util/ports.ts';
import { sharedReconnectDelayS } from '../../src/qemu/command-line.ts';
import { makeTempDir } from '../support/temp.ts';

const execFile = promisify(execFileCallback);
const cli = join(import.meta.dirname, '../../bin/vmferry.js');
let dir: { path: string; remove(): Promise<void> };
let nbdPort: number;
let adminPort: number;
let server: ChildProcess | undefined;

async function startServer(): Promise<void> {
  server = spawn(process.execPath, [cli, 'storage', 'serve', '--data-dir', join(dir.path, 'data'), '--listen', `127.0.0.1:${nbdPort}`, '--admin', `127.0.0.1:${adminPort}`, '--insecure'], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, VMFERRY_LOG: 'warn' },
  });
  for (let i = 0; i < 100; i++) {
    const ok = await fetch(`http://127.0.0.1:${adminPort}/v1/volumes`).then(() => true, () => false);
    if (ok) return;
    await sleep(100);
  }
  throw new Error('storage server did not start');
}

async function stopServer(signal: NodeJS.Signals): Promise<void> {
  const child = server;
  if (!child || child.exitCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill(signal);
  await exited;
  server = undefined;
}

function vmferry(...args: string[]): Promise<{ stdout: string; stderr: string }> {
  return execFile(process.execPath, [cli, ...args, '--storage', `http://127.0.0.1:${adminPort}`]);
}

const uri = (volume: string): string => `nbd://127.0.0.1:${nbdPort}/${volume}`;

before(async () => {
  dir = await makeTempDir('durability');
  nbdPort = await findFreePort('127.0.0.1');
  adminPort = await findFreePort('127.0.0.1');
  await startServer();
});

after(async () => {
  await stopServer('SIGKILL');
  await dir.remove();
});

test('volume create, list and delete through the CLI; deleting a volume with a client, or one whose client just left, is refused', async () => {
  assert.match((await vmferry('volume', 'create', 'data', '--size', '32M')).stdout, /created volume data \(32\.0 MiB\)/);
  await assert.rejects(vmferry('volume', 'create', '../x', '--size', '1G'), /name must match pattern|invalid/);
  await assert.rejects(vmferry('volume', 'create', 'bad', '--size', 'lots'), /--size must be a size such as 4G or 512M \(got "lots"\)/);
  await assert.rejects(vmferry('volume', 'create', 'data', '--size', '1M'), /already exists \[VMF_VOLUME_EXISTS\]/);
  const list = JSON.parse((await execFile(process.execPath, [cli, '--json', 'volume', 'list', '--storage', `http://127.0.0.1:${adminPort}`])).stdout) as { name: string }[];
  assert.deepEqual(list.map((v) => v.name), ['data']);

  // Hold a connection open while trying to delete.
  const holder = spawn('qemu-io', ['-f', 'raw', uri('data')], { stdio: ['pipe', 'ignore', 'ignore'] });
  try {
    for (let i = 0; i < 50; i++) {
      const volumes = (await (await fetch(`http://127.0.0.1:${adminPort}/v1/volumes`)).json()) as { attachments: string[] }[];
      if (volumes[0]?.attachments.length) break;
      await sleep(100);
    }
    await assert.rejects(vmferry('volume', 'rm', 'data'), /has clients .* detach them first, or delete it anyway with --force .*\[VMF_CONFLICT\]/);
  } finally {
    holder.stdin?.end('quit\n');
    await new Promise((resolve) => holder.once('exit', resolve));
  }
  // QEMU reconnects a lost NBD connection for a while: the volume must still be there when it does.
  await assert.rejects(vmferry('volume', 'delete', 'data'), new RegExp(`lost a client .* s ago, and QEMU reconnects for up to ${sharedReconnectDelayS} s.*--force.*\\[VMF_CONFLICT\\]`));
  assert.match((await vmferry('volume', 'create', 'scratch', '--size', '1M')).stdout, /created volume scratch/);
  await execFile('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', uri('scratch')]);
  await assert.rejects(vmferry('volume', 'delete', 'scratch'), /lost a client/);
  assert.match((await vmferry('volume', 'delete', 'scratch', '--force')).stdout, /deleted volume scratch/);
  assert.match((await vmferry('volume', 'quarantine', 'list')).stdout, /^nothing in quarantine$/m);
});

test('flushed writes survive a clean restart and a kill -9', async () => {
  await execFile('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 0 2M', '-c', 'flush', uri('data')]);
  await stopServer('SIGTERM');
  await startServer();
  await execFile('qemu-io', ['-f', 'raw', '-c', 'read -P 0x31 0 2M', '-c', 'write -P 0x32 2M 2M', '-c', 'flush', uri('data')]);
  await stopServer('SIGKILL');
  await startServer();
  const { stdout } = await execFile('qemu-io', ['-f', 'raw', '-c', 'read -P 0x31 0 2M', '-c', 'read -P 0x32 2M 2M', uri('data')]);
  assert.doesNotMatch(stdout, /Pattern verification failed/);
  const volumes = (await (await fetch(`http://127.0.0.1:${adminPort}/v1/volumes`)).json()) as { name: string; sizeBytes: number; attachments: string[] }[];
  assert.deepEqual(volumes.map((v) => [v.name, v.sizeBytes, v.attachments]), [['data', 32 * 1024 * 1024, []]]);
});

test('SIGTERM with a client attached: the server drains, exits, and comes back with the data', async () => {
  const holder = spawn('qemu-io', ['-f', 'raw', uri('data')], { stdio: ['pipe', 'pipe', 'ignore'] });
  try {
    holder.stdin?.write('write -P 0x44 4M 1M\nflush\n');
    for (let i = 0; i < 100; i++) {
      const volumes = (await (await fetch(`http://127.0.0.1:${adminPort}/v1/volumes`)).json()) as { attachments: string[] }[];
      if (volumes[0]?.attachments.length) break;
      await sleep(50);
    }
    await sleep(300);
    const started = Date.now();
    await stopServer('SIGTERM');
    assert.ok(Date.now() - started < 8000, `shutdown took ${Date.now() - started} ms`);
  } finally {
    holder.kill('SIGKILL');
  }
  await startServer();
  const { stdout } = await execFile('qemu-io', ['-f', 'raw', '-c', 'read -P 0x44 4M 1M', uri('data')]);
  assert.doesNotMatch(stdout, /Pattern verification failed/);
});

test('the admin API answers bad bodies with a 400 naming the field, and keeps serving', async () => {
  const post = (body: unknown): Promise<Response> =>
    fetch(`http://127.0.0.1:${adminPort}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const wrongType = await post({ name: 'x', sizeBytes: 'big' });
  assert.equal(wrongType.status, 400);
  assert.match(((await wrongType.json()) as { message: string }).message, /sizeBytes/);
  const pathName = await post({ name: '../etc', sizeBytes: 1048576 });
  assert.equal(pathName.status, 400);
  assert.match(((await pathName.json()) as { message: string }).message, /name/);
  const huge = await fetch(`http://127.0.0.1:${adminPort}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: 'x'.repeat(200_000) });
  assert.equal(huge.status, 413);
  const missing = await fetch(`http://127.0.0.1:${adminPort}/v1/volumes/nope`, { method: 'DELETE' });
  assert.equal(missing.status, 404);
  assert.equal(((await missing.json()) as { code: string }).code, 'VMF_VOLUME_NOT_FOUND');
  assert.equal((await fetch(`http://127.0.0.1:${adminPort}/v1/volumes`)).status, 200);
});

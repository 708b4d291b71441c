// `vmferry controller --db postgres://…` as an operator runs it: a controller process on a real
// PostgreSQL (a throwaway cluster) keeps what it was told across a kill -9 and a restart, and a
// --db it cannot use stops it at once with one line naming the database. No QEMU.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';
import { runVmferry } from '../support/cli.ts';
import { startPostgres, type TestPostgres } from '../support/postgres.ts';

const cli = join(import.meta.dirname, '../../bin/vmferry.js');
let postgres: TestPostgres;
const running = new Set<ChildProcess>();

before(async () => {
  postgres = await startPostgres();
});

after(async () => {
  for (const child of running) child.kill('SIGKILL');
  await postgres.stop();
});

/** Starts `vmferry controller ARGS` and resolves with its URL once it listens, or rejects with its stderr if it exits first. */
async function startController(args: string[], env: Record<string, string> = {}): Promise<{ url: string; child: ChildProcess }> {
  const child = spawn(process.execPath, [cli, 'controller', '--listen', '127.0.0.1:0', '--insecure', ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(child);
  child.once('exit', () => running.delete(child));
  let stderr = '';
  const lines = createInterface({ input: child.stderr as NodeJS.ReadableStream });
  const listening = new Promise<string>((resolve, reject) => {
    lines.on('line', (line) => {
      stderr += `${line}\n`;
      const url = /"url":"(http:[^"]+)".*"msg":"controller listening"/.exec(line)?.[1];
      if (url) resolve(url);
    });
    child.once('exit', (code) => reject(new Error(`controller exited with ${code} before listening:\n${stderr}`)));
  });
  return { url: await listening, child };
}

async function kill9(child: ChildProcess): Promise<void> {
  const exited = once(child, 'exit');
  child.kill('SIGKILL');
  await exited;
}

test('a controller on PostgreSQL keeps its hosts across kill -9 and a restart (--db, then VMFERRY_DB)', async () => {
  const db = await postgres.freshUrl();
  const first = await startController(['--db', db]);
  const heartbeat = await fetch(`${first.url}/v1/hosts/heartbeat`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ id: 'hostA', url: 'http://127.0.0.1:1', address: '127.0.0.1', accelerator: 'tcg', acceleratorReason: 'test' }),
  });
  assert.equal(heartbeat.status, 200);
  const listed = await runVmferry(first.url, ['--json', 'host', 'list']);
  assert.equal(listed.code, 0, listed.stderr);
  assert.deepEqual((JSON.parse(listed.stdout) as { id: string }[]).map((h) => h.id), ['hostA']);
  // Acknowledged, then killed without a chance to flush anything: the row must be in PostgreSQL already.
  await kill9(first.child);

  const second = await startController([], { VMFERRY_DB: db });
  const hosts = (await (await fetch(`${second.url}/v1/hosts`)).json()) as { id: string; accelerator?: string }[];
  assert.deepEqual(hosts.map((h) => [h.id, h.accelerator]), [['hostA', 'tcg']]);
  await kill9(second.child);
});

// More refused --db values, tried in-process: test/store/postgres.test.ts.
test('a --db the controller cannot use: one line naming it (no password, no stack trace), a non-zero exit', async () => {
  const cases: [string, RegExp][] = [
    ['postgres://vmferry:s3cret@127.0.0.1:1/vmferry', /^vmferry: database postgres:\/\/vmferry@127\.0\.0\.1:1\/vmferry: .*ECONNREFUSED.* \[VMF_DATABASE\]$/],
    ['postgres://vmferry:s3cret@127.0.0.1:99999/vmferry', /^vmferry: --db must be a SQLite file or a URL such as postgres:\/\/.* \[VMF_INVALID_ARGUMENT\]$/],
  ];
  for (const [db, message] of cases) {
    const result = await runVmferry('http://127.0.0.1:1', ['controller', '--listen', '127.0.0.1:0', '--insecure', '--db', db]);
    assert.notEqual(result.code, 0, `${db}: the controller started`);
    const lines = result.stderr.split('\n').filter((line) => line.startsWith('vmferry:'));
    assert.equal(lines.length, 1, `${db}: ${result.stderr}`);
    assert.match(lines[0] ?? '', message);
    assert.doesNotMatch(result.stderr, /s3cret|\n\s+at /, `${db}: no password, no stack trace`);
  }
});

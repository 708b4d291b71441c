// A connection taken out of the pool that PostgreSQL ends between two statements (an idle transaction timed out, a
// restart, pg_terminate_backend): the next statement fails with the reason, the process keeps running, the pool
// opens a new connection. Without a listener of its own such a connection crashed the controller: a leader woken
// from SIGSTOP died of "terminating connection due to idle-in-transaction timeout" (test/faults/ha-failover.test.ts).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { withConnection } from '../../src/store/pg-checkout.ts';
import { PostgresStore } from '../../src/store/postgres-store.ts';
import { startPostgres, type TestPostgres } from '../support/postgres.ts';
import { recordReliability } from '../support/reliability.ts';

let postgres: TestPostgres;
before(async () => {
  postgres = await startPostgres();
});
after(() => postgres.stop());

test('a taken-out connection PostgreSQL ends between statements fails its next statement, not the process; the pool opens a new one', async () => {
  const pool = new pg.Pool({ connectionString: await postgres.freshUrl(), max: 1 });
  pool.on('error', () => undefined);
  const admin = new pg.Client({ connectionString: await postgres.freshUrl() });
  await admin.connect();
  try {
    const failure = await withConnection(pool, async (client) => {
      await client.query('BEGIN');
      const pid = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid;
      await admin.query('SELECT pg_terminate_backend($1)', [pid]);
      // Until the server's goodbye has reached this client, with no statement of it running: the unguarded case.
      for (let i = 0; i < 50 && (await admin.query('SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid])).rowCount !== 0; i++) await sleep(20);
      await sleep(200);
      return client.query('SELECT 1').then(() => 'answered', (err: Error) => err.message);
    });
    assert.notEqual(failure, 'answered', 'a statement on the ended connection was answered');
    assert.equal((await pool.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one, 1, 'the pool answers on a new connection');
  } finally {
    await admin.end();
    await pool.end();
  }
});

test('a controller stopped (SIGSTOP) inside its fenced writes, past the idle-transaction timeout, runs on when continued and writes again', async () => {
  const url = await postgres.freshUrl();
  // The schema, and the lease row the writer's fence checks.
  const store = await PostgresStore.open(url);
  await store.close();
  const admin = new pg.Client({ connectionString: url });
  await admin.connect();
  await admin.query("INSERT INTO vmferry_leader (id, holder, epoch, expires_at) VALUES (1, 'writer', 7, clock_timestamp() + interval '1 hour')");
  await admin.end();

  const idleMs = 150;
  const writer = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '../support/fenced-writer.ts'), url, String(idleMs)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let counts = { written: 0, failed: 0 };
  let stderr = '';
  writer.stdout.setEncoding('utf8').on('data', (chunk: string) => {
    const last = chunk.trimEnd().split('\n').at(-1)?.split(' ').map(Number);
    if (last?.length === 2) counts = { written: last[0] ?? 0, failed: last[1] ?? 0 };
  });
  writer.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const exited = new Promise<number | null>((resolve) => writer.on('exit', (code) => resolve(code)));
  try {
    for (let i = 0; i < 100 && counts.written < 20; i++) await sleep(100);
    assert.ok(counts.written >= 20, `the writer wrote ${counts.written} times in 10 s: ${stderr}`);
    // A stop lands inside a transaction more often than not; a few more stops make sure some did.
    let stops = 0;
    for (; stops < 15 && counts.failed < 2; stops++) {
      writer.kill('SIGSTOP');
      await sleep(idleMs * 4);
      writer.kill('SIGCONT');
      await sleep(300);
    }
    const afterStops = counts.written;
    await sleep(1_000);
    assert.equal(writer.exitCode, null, `the writer died after being continued: ${stderr}`);
    assert.ok(counts.written > afterStops, 'the writer writes again after the stops');
    assert.ok(counts.failed >= 1, 'no stop landed inside a write: the case was not tried');
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'controllers (PostgreSQL)',
      tried: `a process writing as a leader does (fenced writes in a loop) stopped ${stops} times (SIGSTOP, ${idleMs * 4} ms each) with an idle-transaction timeout of ${idleMs} ms, then continued`,
      observed: `it kept running: ${counts.failed} writes ended by PostgreSQL failed with the reason, ${counts.written} written in all, writing again after the last stop (was: the process crashed on pg's unhandled 'error' event)`,
      ok: true,
    });
  } finally {
    writer.kill('SIGKILL');
    await exited;
  }
});

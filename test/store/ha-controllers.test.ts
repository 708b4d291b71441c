// Two controllers on one real (throwaway) PostgreSQL, in-process, and an agent without guests:
// the standby answers reads and refuses what would act, naming the leader; a client given both
// URLs reaches the leader either way, follows a takeover, and passes over a paused one within
// seconds; an agent refuses a request stamped with an older leader epoch than it has seen,
// and still does after a restart.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import pino from 'pino';
import { buildAgent } from '../../src/agent/server.ts';
import { leaderEpochHeader, LeaderEpochFence } from '../../src/agent/leader-epoch.ts';
import { ControllerClient } from '../../src/controller/client.ts';
import { LeaderLease } from '../../src/controller/leader-lease.ts';
import { buildController } from '../../src/controller/server.ts';
import { storePoolConfig } from '../../src/store/postgres-store.ts';
import { hasCode } from '../../src/errors.ts';
import { findFreePort } from '../../src/util/ports.ts';
import { runVmferry } from '../support/cli.ts';
import { recordReliability } from '../support/reliability.ts';
import { startPostgres, type TestPostgres } from '../support/postgres.ts';

const logger = pino({ level: 'silent' });
const leaseTtlMs = 1_500;
let postgres: TestPostgres;
let dir: string;

before(async () => {
  postgres = await startPostgres();
  dir = await mkdtemp(join(tmpdir(), 'vmferry-ha-'));
});

after(async () => {
  await postgres.stop();
  await rm(dir, { recursive: true, force: true });
});

async function controller(db: string): Promise<{ app: FastifyInstance; url: string }> {
  const url = `http://127.0.0.1:${await findFreePort('127.0.0.1')}`;
  const { app } = await buildController({ dbPath: db, logger, url, leaseTtlMs });
  await app.listen({ host: '127.0.0.1', port: Number(new URL(url).port) });
  return { app, url };
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    assert.ok(Date.now() < deadline, `${what} did not happen within ${timeoutMs} ms`);
    await sleep(100);
  }
}

test('the standby answers reads and refuses writes naming the leader; a client with both URLs reaches the leader, and the standby after a takeover', async () => {
  const db = await postgres.freshUrl();
  const a = await controller(db);
  const b = await controller(db);
  try {
    const leaderOf = async (url: string): Promise<{ leader: boolean; leaderUrl: string | null; self: string | null }> => (await fetch(`${url}/v1/leader`)).json() as never;
    assert.deepEqual(await leaderOf(b.url), { ...(await leaderOf(b.url)), leader: false, leaderUrl: a.url, self: b.url });
    assert.equal((await leaderOf(a.url)).leader, true);

    // Reads: the standby answers from the shared database, heartbeats included.
    const beat = await fetch(`${b.url}/v1/hosts/heartbeat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id: 'A', url: 'http://127.0.0.9:1', address: '127.0.0.9' }) });
    assert.equal(beat.status, 200);
    assert.deepEqual((await new ControllerClient(a.url).hosts()).map((h) => h.id), ['A']);
    assert.equal((await fetch(`${b.url}/v1/migrations`)).status, 200);

    // A write on the standby: refused, with the leader in the message and the header.
    const refused = await fetch(`${b.url}/v1/vms/web/stop`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' });
    assert.equal(refused.status, 503);
    assert.equal(refused.headers.get('vmferry-leader'), a.url);
    const body = (await refused.json()) as { code: string; message: string };
    assert.equal(body.code, 'VMF_NOT_LEADER');
    assert.match(body.message, new RegExp(`is a standby: the leader is ${a.url}`));

    // Through the client: the standby first, and the request still reaches the leader (which knows no VM "web").
    await assert.rejects(new ControllerClient(`${b.url},${a.url}`).deleteVm('web'), (err) => hasCode(err, 'VMF_NOT_FOUND'));
    await assert.rejects(new ControllerClient(b.url).deleteVm('web'), (err) => hasCode(err, 'VMF_NOT_FOUND'), 'a standby\'s redirect is followed with one URL too');

    // The leader stops (giving the lease up): the standby leads, and the same client list reaches it.
    await a.app.close();
    await until('the standby taking over', async () => ((await leaderOf(b.url)).leader ? true : undefined), leaseTtlMs * 3);
    await assert.rejects(new ControllerClient(`${a.url},${b.url}`).deleteVm('web'), (err) => hasCode(err, 'VMF_NOT_FOUND'));
  } finally {
    await a.app.close();
    await b.app.close();
  }
});

test('the CLI given a paused leader (SIGSTOP) first and a standby answers a read within seconds, not after its request timeout', async () => {
  const db = await postgres.freshUrl();
  const port = await findFreePort('127.0.0.1');
  const pausedUrl = `http://127.0.0.1:${port}`;
  // A process of its own, so it can be stopped as a frozen host would be: its kernel still accepts connections.
  const paused = spawn(process.execPath, [join(import.meta.dirname, '../../bin/vmferry.js'), 'controller', '--listen', `127.0.0.1:${port}`, '--db', db, '--insecure'], { stdio: 'ignore' });
  let standby: { app: FastifyInstance; url: string } | undefined;
  try {
    await until(
      'the controller process leading',
      async () => {
        const status = await fetch(`${pausedUrl}/v1/leader`, { signal: AbortSignal.timeout(1_000) }).then((r) => r.json() as Promise<{ leader: boolean }>, () => undefined);
        return status?.leader ? true : undefined;
      },
      30_000,
    );
    standby = await controller(db);
    paused.kill('SIGSTOP');
    const started = Date.now();
    const read = await runVmferry(`${pausedUrl},${standby.url}`, ['host', 'list']);
    const readMs = Date.now() - started;
    assert.equal(read.code, 0, read.stderr);
    // The CLI's own start, the paused one passed over, the standby's answer: not the 30 s a request to it waited.
    assert.ok(readMs < 15_000, `host list answered after ${readMs} ms`);
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'controllers (PostgreSQL)',
      tried: 'the leading controller paused (SIGSTOP: it accepts connections, never answers); `vmferry host list --controller PAUSED,STANDBY`',
      observed: `the CLI passed over the paused one (no answer to GET /v1/leader within the probe's bound) and the standby answered: exit 0 ${(readMs / 1000).toFixed(1)} s after the CLI was started`,
      ok: true,
    });
  } finally {
    paused.kill('SIGCONT');
    paused.kill('SIGKILL');
    await standby?.app.close();
  }
});

// Found by test/faults/ha-failover.test.ts: a leader SIGSTOPped inside a write held the lease row, and the standby's
// takeover waited for it as long as the leader stayed stopped. The stall is made here as such a write makes it: a
// transaction that took the lease row FOR SHARE and then sends nothing.
test('a leader stalled inside a write, holding the lease row, does not keep a standby from taking over: PostgreSQL ends the idle transaction', async () => {
  const db = await postgres.freshUrl();
  const ttlMs = 1_000;
  const stalledWrite = async (config: pg.ClientConfig): Promise<pg.Client> => {
    const client = new pg.Client(config);
    client.on('error', () => undefined); // the server ending its session is the point
    await client.connect();
    await client.query('BEGIN');
    const held = await client.query("SELECT 1 FROM vmferry_leader WHERE holder = 'stalled' FOR SHARE");
    assert.equal(held.rowCount, 1);
    return client;
  };
  const first = await LeaderLease.start(db, { id: 'first', ttlMs, logger });
  await first.stop();
  // The stalled leader's row: its lease runs out in a moment, as a stopped leader's does.
  const setup = new pg.Client({ connectionString: db });
  await setup.connect();
  await setup.query("UPDATE vmferry_leader SET holder = 'stalled', expires_at = clock_timestamp() + interval '300 milliseconds'");
  await setup.end();

  // Without a timeout on the stalled side (the store before the fix) the standby waits for as long as the stall lasts.
  const unbounded = await stalledWrite({ connectionString: db });
  const blocked = await LeaderLease.start(db, { id: 'blocked', ttlMs, logger });
  await sleep(3 * ttlMs);
  assert.equal(blocked.view().leader, false, 'a standby took over while the stalled transaction held the row');
  await unbounded.query('ROLLBACK');
  await unbounded.end();
  await until('the standby takes over once the stall ends', () => Promise.resolve(blocked.view().leader ? true : undefined), 3 * ttlMs);
  await blocked.stop();
  await sleep(ttlMs);
  const reset = new pg.Client({ connectionString: db });
  await reset.connect();
  await reset.query("UPDATE vmferry_leader SET holder = 'stalled', expires_at = clock_timestamp() + interval '300 milliseconds'");
  await reset.end();

  // With the store's settings, as a controller's own write would stall: ended within half a lease.
  const stalled = await stalledWrite(storePoolConfig(db, { idleInTransactionTimeoutMs: ttlMs / 2 }));
  const standby = await LeaderLease.start(db, { id: 'standby', ttlMs, logger });
  const started = performance.now();
  try {
    await until('the standby takes over from the stalled leader', () => Promise.resolve(standby.view().leader ? true : undefined), 4 * ttlMs);
  } finally {
    await standby.stop();
    await stalled.end().catch(() => undefined);
  }
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'controllers (PostgreSQL)',
    tried: 'a leader stalled inside a write (its transaction holding the lease row FOR SHARE, then silent), its lease running out',
    observed: `a standby led ${Math.round(performance.now() - started)} ms later (lease TTL ${ttlMs} ms): PostgreSQL ended the idle transaction after ${ttlMs / 2} ms (was: the standby waited for as long as the stall lasted)`,
    ok: true,
  });
});

test('an agent refuses a request stamped with an older leader epoch than it has seen, also after a restart; unstamped requests pass', async () => {
  const dataDir = join(dir, 'agent');
  let agent = (await buildAgent({ hostId: 'A', dataDir, address: '127.0.0.1', logger })).app;
  try {
    const list = (epoch?: string) => agent.inject({ method: 'GET', url: '/v1/vms', headers: epoch === undefined ? {} : { [leaderEpochHeader]: epoch } });
    assert.equal((await list()).statusCode, 200);
    assert.equal((await list('3')).statusCode, 200);
    assert.equal((await list('3')).statusCode, 200);
    const stale = await list('2');
    assert.equal(stale.statusCode, 409);
    assert.equal(stale.json<{ code: string }>().code, 'VMF_STALE_LEADER');
    assert.match(stale.json<{ message: string }>().message, /carries leader epoch 2, and this agent has seen epoch 3/);
    assert.equal((await list('x1')).statusCode, 400);
    assert.equal((await list()).statusCode, 200, 'a single controller stamps nothing');

    await agent.close();
    agent = (await buildAgent({ hostId: 'A', dataDir, address: '127.0.0.1', logger })).app;
    assert.equal((await list('2')).statusCode, 409, 'the highest epoch survives the agent\'s restart');
    assert.equal((await LeaderEpochFence.load(dataDir, logger)).highest, 3);
    assert.equal((await list('4')).statusCode, 200);
  } finally {
    await agent.close();
  }
});

// The leader lease (src/controller/leader-lease.ts) between controllers sharing a real PostgreSQL
// (a throwaway cluster): one leads, the others stand by; when the leader is cut off from the
// database it stops acting by its own clock before a standby takes over with a higher epoch.
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { LeaderLease, type LeaseView } from '../../src/controller/leader-lease.ts';
import { PostgresStore } from '../../src/store/postgres-store.ts';
import { hasCode } from '../../src/errors.ts';
import { startPostgres, type TestPostgres } from '../support/postgres.ts';
import { TcpRelay } from '../support/tcp-relay.ts';

const ttlMs = 1500;
const logger = pino({ level: 'silent' });
let postgres: TestPostgres;

before(async () => {
  postgres = await startPostgres();
});

after(() => postgres.stop());

/** A lease for controller `id` that logs each change with its monotonic time. */
async function controller(url: string, id: string): Promise<{ lease: LeaderLease; changes: (LeaseView & { at: number })[] }> {
  const changes: (LeaseView & { at: number })[] = [];
  const lease = await LeaderLease.start(url, { id, ttlMs, logger, onChange: (view) => changes.push({ ...view, at: performance.now() }) });
  return { lease, changes };
}

async function until(what: string, condition: () => boolean, timeoutMs: number): Promise<number> {
  const start = performance.now();
  while (!condition()) {
    assert.ok(performance.now() - start < timeoutMs, `${what} did not happen within ${timeoutMs} ms`);
    await sleep(20);
  }
  return performance.now() - start;
}

test('one controller leads, the other stands by and names it; a standby cannot fence', async () => {
  const url = await postgres.freshUrl();
  const a = await controller(url, 'http://a:10800');
  const b = await controller(url, 'http://b:10800');
  try {
    assert.deepEqual(a.lease.view(), { leader: true, holder: 'http://a:10800', epoch: 1 });
    assert.deepEqual(b.lease.view(), { leader: false, holder: 'http://a:10800', epoch: 1 });
    assert.equal(a.lease.fence(), 1);
    assert.throws(() => b.lease.fence(), (err) => hasCode(err, 'VMF_NOT_LEADER') && /the leader is http:\/\/a:10800/.test(err.message));
    // Renewals keep the same tenure: no new epoch while nothing happens.
    await sleep(ttlMs * 1.5);
    assert.deepEqual([a.lease.view().epoch, a.lease.view().leader, b.lease.view().leader], [1, true, false]);
  } finally {
    await Promise.all([a.lease.stop(), b.lease.stop()]);
  }
});

test('a leader cut off from PostgreSQL stops leading by its own clock, before the standby takes over with a higher epoch', async (t) => {
  const url = await postgres.freshUrl();
  const relay = await TcpRelay.start('127.0.0.1', Number(new URL(url).port));
  const viaRelay = url.replace(/:\d+\//, `:${relay.port}/`);
  const a = await controller(viaRelay, 'http://a:10800');
  const b = await controller(url, 'http://b:10800');
  try {
    assert.equal(a.lease.view().leader, true);
    const cutAt = performance.now();
    relay.cut();
    const takeoverMs = await until('the standby taking over', () => b.lease.view().leader, ttlMs * 4);
    assert.equal(b.lease.fence(), 2);
    assert.equal(a.lease.view().leader, false);
    assert.throws(() => a.lease.fence(), (err) => hasCode(err, 'VMF_NOT_LEADER'));
    const aLost = a.changes.find((c) => !c.leader);
    const bWon = b.changes.find((c) => c.leader);
    assert.ok(aLost && bWon);
    assert.ok(aLost.at <= bWon.at, `the old leader stepped down ${(aLost.at - bWon.at).toFixed(0)} ms after the new one took over`);
    assert.ok(takeoverMs < ttlMs * 2, `takeover took ${takeoverMs.toFixed(0)} ms after the cut (lease ${ttlMs} ms)`);
    t.diagnostic(`takeover ${takeoverMs.toFixed(0)} ms after the cut; the old leader stepped down ${(aLost.at - cutAt).toFixed(0)} ms after it (lease ${ttlMs} ms)`);
  } finally {
    await Promise.all([a.lease.stop(), b.lease.stop()]);
    await relay.close();
  }
});

test('a leader whose connection the server drops reconnects and keeps its tenure: no failover', async () => {
  const url = await postgres.freshUrl();
  const a = await controller(url, 'http://a:10800');
  const b = await controller(url, 'http://b:10800');
  try {
    assert.ok((await postgres.terminate('vmferry-lease http://a:10800')) >= 1);
    await sleep(ttlMs * 2);
    assert.deepEqual(a.lease.view(), { leader: true, holder: 'http://a:10800', epoch: 1 });
    assert.equal(b.lease.view().leader, false);
    assert.ok(b.changes.every((c) => !c.leader));
  } finally {
    await Promise.all([a.lease.stop(), b.lease.stop()]);
  }
});

test('a leader that stops gives the lease up: the standby leads at its next attempt, with a higher epoch', async (t) => {
  const url = await postgres.freshUrl();
  const a = await controller(url, 'http://a:10800');
  const b = await controller(url, 'http://b:10800');
  try {
    await a.lease.stop();
    const ms = await until('the standby taking over', () => b.lease.view().leader, ttlMs);
    assert.ok(ms < ttlMs, `took ${ms.toFixed(0)} ms`);
    t.diagnostic(`takeover ${ms.toFixed(0)} ms after the leader stopped`);
    assert.equal(b.lease.fence(), 2);
  } finally {
    await b.lease.stop();
  }
});

test("the database refuses the writes of a leader whose lease passed to another, inside each write's transaction: a leader paused between its own check and its write cannot overwrite its successor", async () => {
  const url = await postgres.freshUrl();
  const store = await PostgresStore.open(url);
  const a = await controller(url, 'http://a:10800');
  const b = await controller(url, 'http://b:10800');
  let aStopped = false;
  try {
    const asA = store.fencedBy({ holder: 'http://a:10800', epoch: 1 });
    await asA.createMigration({ id: 'm1', vm: 'web', from: 'A', to: 'B', phase: 'migrating', plan: {} as never, report: null, createdAt: 1, updatedAt: 1 });
    await asA.appendEvent('m1', { type: 'phase', phase: 'migrating', at: 1 });
    // A lets go (as a paused leader's lease runs out); B takes over with epoch 2 and settles the migration.
    await a.lease.stop();
    aStopped = true;
    await until('the standby taking over', () => b.lease.view().leader, 10 * ttlMs);
    assert.equal(b.lease.view().epoch, 2);
    const asB = store.fencedBy({ holder: 'http://b:10800', epoch: 2 });
    await asB.updateMigration('m1', { phase: 'failed' });

    // A wakes with its tenure's token: every write it tries is refused by the database, naming why; nothing changes.
    const refused = (err: unknown): boolean => hasCode(err, 'VMF_NOT_LEADER') && /refused a write of http:\/\/a:10800: its leader lease \(epoch 1\) has expired or passed to another controller/.test((err as Error).message);
    await assert.rejects(asA.updateMigration('m1', { phase: 'completed' }), refused);
    await assert.rejects(asA.appendEvent('m1', { type: 'phase', phase: 'completed', at: 2 }), refused);
    await assert.rejects(asA.setVmLocation({ name: 'web', hostId: 'B' }), refused);
    await assert.rejects(asA.createMigration({ id: 'm2', vm: 'web', from: 'A', to: 'B', phase: 'preparing', plan: {} as never, report: null, createdAt: 2, updatedAt: 2 }), refused);
    assert.equal((await store.getMigration('m1'))?.phase, 'failed');
    assert.deepEqual((await store.eventsSince('m1', 0)).length, 1);
    assert.equal(await store.getVmLocation('web'), undefined);
    assert.equal(await store.getMigration('m2'), undefined);
    // The same store's connections still serve the leader's writes: a refused transaction was rolled back, not left open.
    for (let i = 0; i < 6; i++) await asB.appendEvent('m1', { type: 'phase', phase: 'failed', at: 3 + i });
    assert.equal((await store.eventsSince('m1', 0)).length, 7);
  } finally {
    await Promise.all([aStopped ? undefined : a.lease.stop(), b.lease.stop()]);
    await store.close();
  }
});

// The leader lease (src/controller/leader-lease.ts) between controllers sharing a real PostgreSQL
// (a throwaway cluster): one leads, the others stand by; when the leader is cut off from the
// database it stops acting by its own clock before a standby takes over with a higher epoch.
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { LeaderLease, type LeaseView } from '../../src/controller/leader-lease.ts';
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

// The Store contract (test/store/contract.ts) on a real PostgreSQL (a throwaway
// cluster: test/support/postgres.ts), and what only a shared database has:
// several controllers opening and writing it at once, a server that is not there.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { openStore } from '../../src/store/open-store.ts';
import { PostgresStore } from '../../src/store/postgres-store.ts';
import { schemaSteps } from '../../src/store/postgres-schema.ts';
import { startPostgres, type TestPostgres } from '../support/postgres.ts';
import { storeContract } from './contract.ts';

let postgres: TestPostgres;
const urls = new Map<string, string>();

before(async () => {
  postgres = await startPostgres();
});

after(() => postgres.stop());

storeContract('PostgreSQL', async (name) => {
  let url = urls.get(name);
  if (!url) {
    url = await postgres.freshUrl();
    urls.set(name, url);
  }
  return PostgresStore.open(url);
});

test('PostgreSQL: controllers starting at once on an empty database apply each schema step once, and all of them work', async () => {
  const url = await postgres.freshUrl();
  const stores = await Promise.all(Array.from({ length: 4 }, () => PostgresStore.open(url)));
  try {
    const schema = /search_path=(\w+)/.exec(decodeURIComponent(url))?.[1];
    const versions = await postgres.query<{ version: number }>(`SELECT version FROM ${schema}.vmferry_schema ORDER BY version`);
    assert.deepEqual(versions.map((v) => v.version), schemaSteps.map((s) => s.version));
    await stores[0]?.upsertHost({ id: 'A', url: 'http://10.0.0.1:10801', address: '10.0.0.1', lastSeen: 1 });
    for (const store of stores) assert.equal((await store.listHosts()).length, 1);
  } finally {
    await Promise.all(stores.map((s) => s.close()));
  }
});

test('PostgreSQL: two controllers appending events to one migration at once number them 1..n with no gap or repeat', async () => {
  const url = await postgres.freshUrl();
  const [one, two] = await Promise.all([PostgresStore.open(url), PostgresStore.open(url)]);
  assert.ok(one && two);
  try {
    await one.createMigration({ id: 'm1', vm: 'web', from: 'A', to: 'B', phase: 'migrating', plan: {} as never, report: null, createdAt: 1, updatedAt: 1 });
    const n = 60;
    await Promise.all(Array.from({ length: n }, (_, i) => (i % 2 ? one : two).appendEvent('m1', { type: 'phase', phase: 'migrating', at: i })));
    assert.deepEqual((await two.eventsSince('m1', 0)).map((e) => e.seq), Array.from({ length: n }, (_, i) => i + 1));
  } finally {
    await Promise.all([one.close(), two.close()]);
  }
});

test('PostgreSQL: a database written by a newer vmferry is refused, naming it without its password', async () => {
  const url = await postgres.freshUrl();
  await (await PostgresStore.open(url)).close();
  const schema = /search_path=(\w+)/.exec(decodeURIComponent(url))?.[1];
  await postgres.query(`INSERT INTO ${schema}.vmferry_schema (version, applied_at) VALUES (999, 0)`);
  const withPassword = url.replace('vmferry@', 'vmferry:s3cret@');
  await assert.rejects(PostgresStore.open(withPassword), (err) => {
    assert.ok(hasCode(err, 'VMF_DATABASE'));
    assert.match(err.message, /schema version 999, newer than this vmferry knows/);
    assert.match(err.message, /vmferry@127\.0\.0\.1/);
    assert.doesNotMatch(err.message, /s3cret/);
    return true;
  });
});

test('PostgreSQL: a server that is not there is a VMF_DATABASE error naming it', async () => {
  // Port 1 on loopback: nothing listens there.
  await assert.rejects(PostgresStore.open('postgres://vmferry:s3cret@127.0.0.1:1/vmferry'), (err) => {
    assert.ok(hasCode(err, 'VMF_DATABASE'));
    assert.match(err.message, /postgres:\/\/vmferry@127\.0\.0\.1:1\/vmferry/);
    assert.match(err.message, /ECONNREFUSED/);
    assert.doesNotMatch(err.message, /s3cret/);
    return true;
  });
});

test('PostgreSQL: a session whose commits are not durable (synchronous_commit off) is refused', async () => {
  const url = await postgres.freshUrl();
  const lossy = url.replace(/options=([^&]*)/, (_, options: string) => `options=${encodeURIComponent(`${decodeURIComponent(options)} -c synchronous_commit=off`)}`);
  await assert.rejects(PostgresStore.open(lossy), (err) => hasCode(err, 'VMF_DATABASE') && /synchronous_commit = off/.test(err.message));
});

test('--db values that are neither a SQLite file nor a usable PostgreSQL are named in the error', async () => {
  const cases: [string, string, RegExp][] = [
    ['mysql://vmferry:s3cret@127.0.0.1/vmferry', 'VMF_INVALID_ARGUMENT', /^--db must be a SQLite file or a postgres:\/\/ URL \(got "mysql:\/\/vmferry:…@127\.0\.0\.1\/vmferry"\)$/],
    ['postgres://vmferry:s3cret@127.0.0.1:99999/vmferry', 'VMF_INVALID_ARGUMENT', /^--db must be a SQLite file or a URL such as postgres:\/\//],
    [postgres.url.replace(/\/postgres$/, '/nosuchdb'), 'VMF_DATABASE', /^database postgres:\/\/vmferry@127\.0\.0\.1:\d+\/nosuchdb: database "nosuchdb" does not exist$/],
    ['/nonexistent-dir/controller.db', 'VMF_DATABASE', /^database \/nonexistent-dir\/controller\.db: .*directory does not exist/],
  ];
  for (const [db, code, message] of cases) {
    await assert.rejects(openStore(db), (err) => {
      assert.ok(hasCode(err, code as 'VMF_DATABASE'), `${db}: ${String(err)}`);
      assert.match(err.message, message);
      assert.doesNotMatch(err.message, /s3cret/);
      return true;
    });
  }
});

test('PostgreSQL: what a store acknowledged survives the server crashing, and the same store answers once it is back', async () => {
  const store = await PostgresStore.open(await postgres.freshUrl());
  try {
    await store.createMigration({ id: 'm1', vm: 'web', from: 'A', to: 'B', phase: 'migrating', plan: {} as never, report: null, createdAt: 1, updatedAt: 1 });
    await store.updateMigration('m1', { phase: 'resume-sent' });
    await postgres.restart();
    // The pool's connections died with the server: a query may fail once (VMF_DATABASE) while it notices, never twice.
    const read = () => store.getMigration('m1');
    const stored = await read().catch(async (err: unknown) => {
      assert.ok(hasCode(err, 'VMF_DATABASE'), String(err));
      return read();
    });
    assert.equal(stored?.phase, 'resume-sent');
    await store.appendEvent('m1', { type: 'phase', phase: 'resume-sent', at: 2 });
  } finally {
    await store.close();
  }
});

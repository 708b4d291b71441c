// The controller's live streams (server-sent events) and the dashboard's files,
// on an in-process controller over real HTTP. No agent and no QEMU: the
// migrations are records written into the controller's store, as its
// migration runs write them.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import type { EventSourceMessage } from 'eventsource-parser';
import { ControllerClient } from '../../src/controller/client.ts';
import { announcingStore, MigrationChanges } from '../../src/controller/events.ts';
import { buildController } from '../../src/controller/server.ts';
import { hasCode } from '../../src/errors.ts';
import { readEventStream } from '../../src/http/event-source.ts';
import type { MigrationEvent, MigrationReport } from '../../src/migration/phases.ts';
import type { Store } from '../../src/store/store.ts';

let dir: string;
let controller: FastifyInstance;
let store: Store;
let url: string;
let api: ControllerClient;

const ramEvent = (sent: number): MigrationEvent => ({ type: 'ram', ram: { transferredBytes: sent, remainingBytes: 1000 - sent, totalBytes: 1000, dirtyRateBytes: 10, expectedDowntimeMs: 5, iteration: 1 } });

async function createMigration(id: string): Promise<void> {
  const now = Date.now();
  // The plan is only carried through: the streams never read into it.
  await store.createMigration({ id, vm: 'web', from: 'A', to: 'B', phase: 'migrating', plan: { vm: 'web' } as never, report: null, createdAt: now, updatedAt: now });
}

/** Reads messages of a stream one at a time, each with the time it took to come. */
function reader(stream: AsyncGenerator<EventSourceMessage>): () => Promise<{ message: EventSourceMessage | undefined; ms: number }> {
  return async () => {
    const start = Date.now();
    const next = await stream.next();
    return { message: next.done ? undefined : next.value, ms: Date.now() - start };
  };
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-dashboard-events-'));
  const built = await buildController({ dbPath: join(dir, 'controller.db'), logger: pino({ level: 'silent' }) });
  controller = built.app;
  store = built.store;
  url = await controller.listen({ host: '127.0.0.1', port: 0 });
  api = new ControllerClient(url);
});

after(async () => {
  await controller?.close();
  await rm(dir, { recursive: true, force: true });
});

test("a migration's stream: stored events, then each new one as it is stored, then the report, and the stream ends; a client resumes after the last it saw", async () => {
  await createMigration('m1');
  await store.appendEvent('m1', { type: 'phase', phase: 'migrating', at: Date.now() });
  await store.appendEvent('m1', ramEvent(100));
  const stop = new AbortController();
  const next = reader(api.migrationStream('m1', 0, stop.signal));
  const first = await next();
  assert.equal(first.message?.event, 'progress');
  const data = JSON.parse(first.message.data) as { id: string; seq: number; at: number; event: MigrationEvent };
  assert.deepEqual([data.id, data.seq, typeof data.at, data.event.type], ['m1', 1, 'number', 'phase']);
  assert.equal(first.message.id, '1', 'the SSE id is the event number, for Last-Event-ID');
  assert.equal((await next()).message?.id, '2');

  // Stored while the stream waits: it comes without the client asking again.
  const writing = store.appendEvent('m1', ramEvent(500));
  const live = await next();
  await writing;
  assert.equal(live.message?.id, '3');
  assert.deepEqual((JSON.parse(live.message.data) as { event: MigrationEvent }).event, ramEvent(500));
  console.log(`# a new event reached the stream ${live.ms} ms after it was stored`);

  const report = { outcome: 'completed', vm: 'web' } as MigrationReport;
  await store.updateMigration('m1', { phase: 'completed', report });
  const last = await next();
  assert.equal(last.message?.event, 'report');
  assert.deepEqual(JSON.parse(last.message.data), { id: 'm1', report });
  assert.equal((await next()).message, undefined, 'the stream ends after the report');

  // A client that saw up to 2 gets 3 and the report.
  const resumed: EventSourceMessage[] = [];
  for await (const message of api.migrationStream('m1', 2, stop.signal)) resumed.push(message);
  assert.deepEqual(resumed.map((m) => [m.event, m.id]), [['progress', '3'], ['report', undefined]]);
});

test("every write to a migration through the controller's store, or a leader's fenced view of it, wakes a waiting stream at once", { timeout: 20_000 }, async () => {
  const changes = new MigrationChanges();
  const announcing = announcingStore(store, changes);
  await createMigration('woken');
  const subscription = changes.subscribe();
  const stop = new AbortController();
  try {
    // Each wait would last a minute (past the test's timeout) unless the write wakes it.
    // A leader writes through its fenced view (PostgreSQL's check of its lease): that is heard too.
    const leader = announcing.fencedBy({ holder: 'http://a:10800', epoch: 1 });
    for (const write of [() => announcing.appendEvent('woken', ramEvent(1)), () => announcing.updateMigration('woken', { phase: 'resumed' }), () => leader.appendEvent('woken', ramEvent(3))]) {
      const woken = subscription.next(60_000, stop.signal);
      await write();
      assert.deepEqual(await woken, ['woken']);
    }
    // A write while nobody waits is kept for the next look, not lost.
    await announcing.appendEvent('woken', ramEvent(2));
    assert.deepEqual(await subscription.next(60_000, stop.signal), ['woken']);
  } finally {
    subscription.close();
    stop.abort();
  }
});

test('a stream of a migration that does not exist is refused with its code; a bad position is refused too', async () => {
  const stop = new AbortController();
  await assert.rejects(api.migrationStream('nope', 0, stop.signal).next(), (err) => hasCode(err, 'VMF_NOT_FOUND') && /no migration nope/.test(err.message));
  await assert.rejects(readEventStream(url, '/v1/migrations/m1/stream?after=-1', { signal: stop.signal }).next(), (err) => hasCode(err, 'VMF_INVALID_ARGUMENT'));
});

test("every migration's stream: records and the progress of running ones, then changes as they are stored", async () => {
  await createMigration('done');
  await store.appendEvent('done', ramEvent(10));
  await store.updateMigration('done', { phase: 'completed', report: { outcome: 'completed' } as MigrationReport });
  await createMigration('running');
  await store.appendEvent('running', ramEvent(10));
  const stop = new AbortController();
  const stream = readEventStream(url, '/v1/live', { signal: stop.signal });
  /** The next message about this test's migrations (the stream also tells of the other tests'). */
  const next = async (): Promise<{ event: string | undefined; data: { id: string; phase?: string; seq?: number }; ms: number }> => {
    const start = Date.now();
    for (;;) {
      const result = await stream.next();
      if (result.done) assert.fail('the stream ended');
      const value = result.value;
      const data = JSON.parse(value.data) as { id: string; phase?: string; seq?: number };
      if (data.id === 'done' || data.id === 'running') return { event: value.event, data, ms: Date.now() - start };
    }
  };
  const seen: string[] = [];
  // The finished one: its record only; the running one: its record and its events so far.
  for (let i = 0; i < 3; i++) {
    const { event, data } = await next();
    seen.push(`${event} ${data.id}${data.phase ? ` ${data.phase}` : ''}${data.seq ? ` #${data.seq}` : ''}`);
  }
  assert.deepEqual(seen, ['migration done completed', 'migration running migrating', 'progress running #1']);

  await store.appendEvent('running', ramEvent(20));
  const progress = await next();
  assert.deepEqual([progress.event, progress.data.id, progress.data.seq], ['progress', 'running', 2]);

  await store.updateMigration('running', { phase: 'failed', report: { outcome: 'failed' } as MigrationReport });
  const record = await next();
  assert.deepEqual([record.event, record.data.phase], ['migration', 'failed']);
  stop.abort();
});

test('the controller closes promptly with a stream open', async () => {
  const stop = new AbortController();
  const built = Date.now();
  const other = await buildController({ dbPath: join(dir, 'other.db'), logger: pino({ level: 'silent' }) });
  await other.store.createMigration({ id: 'x', vm: 'web', from: 'A', to: 'B', phase: 'migrating', plan: {} as never, report: null, createdAt: built, updatedAt: built });
  const otherUrl = await other.app.listen({ host: '127.0.0.1', port: 0 });
  const open = readEventStream(otherUrl, '/v1/migrations/x/stream', { signal: stop.signal });
  const waiting = open.next();
  await new Promise((resolve) => setTimeout(resolve, 200));
  const closing = Date.now();
  await other.app.close();
  assert.ok(Date.now() - closing < 2000, `close took ${Date.now() - closing} ms`);
  assert.equal((await waiting).done, true, 'the stream ended with the server');
  stop.abort();
});

test('the dashboard: its page and libraries from the controller, under a content security policy; nothing else by path', async () => {
  const root = await fetch(`${url}/`, { redirect: 'manual' });
  assert.equal(root.status, 302);
  assert.equal(root.headers.get('location'), '/ui/');
  const page = await fetch(`${url}/ui/`);
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type') ?? '', /^text\/html/);
  assert.match(page.headers.get('content-security-policy') ?? '', /default-src 'self'/);
  assert.match(await page.text(), /<script type="module" src="app.js">/);
  for (const path of ['app.js', 'style.css', 'vendor/preact-htm.js', 'vendor/uplot.js', 'vendor/uplot.css']) {
    const response = await fetch(`${url}/ui/${path}`);
    assert.equal(response.status, 200, path);
    assert.ok((await response.text()).length > 100, path);
  }
  for (const path of ['../package.json', '..%2fpackage.json', 'vendor/../../server.ts', 'dashboard.ts']) {
    const response = await fetch(`${url}/ui/${path}`);
    assert.equal(response.status, 404, path);
  }
});

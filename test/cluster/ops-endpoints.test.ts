// The endpoints a service manager and a monitor use (GET /healthz on every
// daemon, GET /metrics on the controller), on in-process daemons over real
// HTTP. No VM is started: the agent's health asks its QEMU binary for its
// version only.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { buildAgent } from '../../src/agent/server.ts';
import { buildController } from '../../src/controller/server.ts';
import { StorageServer } from '../../src/storage/server.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import type { MigrationRecord, Store } from '../../src/store/store.ts';
import type { MigrationReport } from '../../src/migration/phases.ts';
import { runProgram } from '../../src/util/run.ts';

const packageVersion = (JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

let dir: string;
let controller: FastifyInstance;
let agent: FastifyInstance;
let storage: StorageServer;
let store: SqliteStore;
const urls = {} as Record<'controller' | 'agent' | 'storage', string>;
/** While set, every read of the controller's store fails as a database that went away does. */
let storeDown: Error | undefined;

/** The controller's real SQLite store, with reads that fail while `storeDown` is set. */
function failableStore(store: Store): Store {
  return new Proxy(store, {
    get(target, property, receiver) {
      const value: unknown = Reflect.get(target, property, receiver);
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => (storeDown && property !== 'close' ? Promise.reject(storeDown) : (value as (...a: unknown[]) => unknown).apply(target, args));
    },
  });
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-ops-'));
  const logger = pino({ level: 'silent' });
  store = new SqliteStore(join(dir, 'controller.db'));
  controller = (await buildController({ dbPath: join(dir, 'controller.db'), logger, store: failableStore(store) })).app;
  urls.controller = await controller.listen({ host: '127.0.0.1', port: 0 });
  agent = (await buildAgent({ hostId: 'A', dataDir: join(dir, 'agent'), address: '127.0.0.1', logger })).app;
  urls.agent = await agent.listen({ host: '127.0.0.1', port: 0 });
  storage = await StorageServer.start({ dataDir: join(dir, 'storage'), logger, admin: { host: '127.0.0.1', port: 0 } });
  urls.storage = storage.addresses.adminUrl as string;
  await post(urls.controller, '/v1/hosts/heartbeat', { id: 'A', url: urls.agent, address: '127.0.0.1', accelerator: 'tcg' });
  await post(urls.storage, '/v1/volumes', { name: 'v1', sizeBytes: 1 << 20 });
});

after(async () => {
  await controller?.close();
  await agent?.close();
  await storage?.close();
  await rm(dir, { recursive: true, force: true });
});

async function post(base: string, path: string, body: unknown): Promise<void> {
  const response = await fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  assert.ok(response.ok, `${path}: ${response.status} ${await response.text()}`);
}

async function health(base: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const response = await fetch(`${base}/healthz`);
  return { status: response.status, body: (await response.json()) as Record<string, unknown> };
}

test('GET /healthz on the controller: ok, with what its store says', async () => {
  const { status, body } = await health(urls.controller);
  assert.equal(status, 200);
  assert.deepEqual({ ...body, uptimeS: typeof body.uptimeS }, { status: 'ok', role: 'controller', version: packageVersion, uptimeS: 'number', store: 'ok', leader: true, hosts: 1, hostsReachable: 1, migrationsRunning: 0 });
});

test('GET /healthz on the controller answers 503 with the reason while its store fails, and ok again once it is back', async () => {
  storeDown = new Error('connection to the database lost (test)');
  try {
    const { status, body } = await health(urls.controller);
    assert.equal(status, 503);
    assert.equal(body.status, 'unhealthy');
    assert.equal(body.role, 'controller');
    assert.equal(body.reason, 'connection to the database lost (test)');
  } finally {
    storeDown = undefined;
  }
  assert.equal((await health(urls.controller)).status, 200);
});

test('GET /healthz on an agent: its accelerator and the version of its QEMU binary', async () => {
  const expectedQemu = /version (\S+)/.exec(await runProgram('qemu-system-x86_64', ['--version']))?.[1];
  const { status, body } = await health(urls.agent);
  assert.equal(status, 200);
  assert.deepEqual({ ...body, uptimeS: typeof body.uptimeS }, { status: 'ok', role: 'agent', version: packageVersion, uptimeS: 'number', hostId: 'A', accelerator: 'tcg', qemuVersion: expectedQemu, vms: 0 });
});

test('GET /healthz on an agent whose host has no QEMU answers 503 saying so, and ok once QEMU is there', async () => {
  // A second agent, whose first check runs with a PATH where no QEMU binary is found.
  const lonely = (await buildAgent({ hostId: 'Q', dataDir: join(dir, 'agent-q'), address: '127.0.0.1', logger: pino({ level: 'silent' }) })).app;
  try {
    const url = await lonely.listen({ host: '127.0.0.1', port: 0 });
    const path = process.env.PATH;
    process.env.PATH = join(dir, 'no-such-bin');
    let missing: Awaited<ReturnType<typeof health>>;
    try {
      missing = await health(url);
    } finally {
      process.env.PATH = path;
    }
    assert.equal(missing.status, 503);
    assert.deepEqual([missing.body.status, missing.body.role], ['unhealthy', 'agent']);
    assert.equal(missing.body.reason, 'qemu-system-x86_64 --version: not installed (run scripts/setup.sh)');
    // A failed check is not remembered: QEMU installed meanwhile is found at the next one.
    assert.equal((await health(url)).status, 200);
  } finally {
    await lonely.close();
  }
});

test('GET /healthz on the storage server: its volumes and NBD connections', async () => {
  const { status, body } = await health(urls.storage);
  assert.equal(status, 200);
  assert.deepEqual({ ...body, uptimeS: typeof body.uptimeS }, { status: 'ok', role: 'storage', version: packageVersion, uptimeS: 'number', volumes: 1, nbdConnections: 0 });
});

const MiB = 1024 * 1024;
// The store keeps a plan as an opaque document; the metrics read only reports and phases.
const plan = { vm: 'web', disks: [], options: {} } as unknown as MigrationRecord['plan'];

function report(outcome: MigrationReport['outcome'], figures: Pick<MigrationReport, 'totalMs' | 'pauseMs' | 'allAttempts'> & { ramBytes: number; mirrorBytes: number[] }): MigrationReport {
  return {
    vm: 'web',
    from: 'A',
    to: 'B',
    outcome,
    disks: figures.mirrorBytes.map((bytesSent, i) => ({ id: `d${i}`, operation: 'mirror', bytesSent, virtualSize: 64 * MiB })),
    ram: { transferredBytes: figures.ramBytes, totalBytes: 64 * MiB, passes: 3, memoryCompared: outcome === 'completed' },
    phases: [],
    totalMs: figures.totalMs,
    downtimeMs: undefined,
    ...(figures.pauseMs === undefined ? {} : { pauseMs: figures.pauseMs }),
    ...(figures.allAttempts ? { allAttempts: figures.allAttempts } : {}),
  };
}

async function addMigration(id: string, phase: MigrationRecord['phase'], finished?: MigrationReport): Promise<void> {
  const now = Date.now();
  await store.createMigration({ id, vm: `vm-${id}`, from: 'A', to: 'B', phase: 'pending', plan, report: null, createdAt: now, updatedAt: now });
  await store.updateMigration(id, { phase, ...(finished ? { report: finished } : {}) });
}

/** The exposition's samples by series ("name{labels}"), after checking every line is a comment or a sample. */
function samples(text: string): Map<string, number> {
  assert.ok(text.endsWith('\n'), 'the exposition ends with a newline');
  const found = new Map<string, number>();
  for (const line of text.trimEnd().split('\n')) {
    if (line.startsWith('# HELP ') || line.startsWith('# TYPE ')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})?) (\S+)$/.exec(line);
    assert.ok(match, `not a sample line: ${line}`);
    assert.ok(!found.has(match[1] as string), `series ${match[1]} twice`);
    found.set(match[1] as string, Number(match[2]));
  }
  return found;
}

test('GET /metrics on the controller: outcomes, durations, pauses and bytes counted from the stored reports, running migrations and hosts', async () => {
  await addMigration('m1', 'completed', report('completed', { totalMs: 4_200, pauseMs: 120, ramBytes: 100 * MiB, mirrorBytes: [50 * MiB, 2 * MiB] }));
  // Two attempts: the sums over both count, not the last attempt's figures.
  await addMigration('m2', 'completed', report('completed', { totalMs: 65_000, pauseMs: 900, ramBytes: 200 * MiB, mirrorBytes: [10 * MiB], allAttempts: { count: 2, ramBytes: 300 * MiB, diskBytes: 70 * MiB, pauseMs: 1_000 } }));
  // A pause nobody measured adds nothing to the pause histogram.
  await addMigration('m3', 'failed', report('failed', { totalMs: 1_500, ramBytes: 10 * MiB, mirrorBytes: [] }));
  await addMigration('m4', 'cancelled', report('cancelled', { totalMs: 700, pauseMs: 0, ramBytes: 0, mirrorBytes: [1 * MiB] }));
  await addMigration('m5', 'mirroring');
  // A host whose agent stopped heartbeating an hour ago.
  await store.upsertHost({ id: 'B', url: 'http://127.0.0.1:1', address: '127.0.0.2', lastSeen: Date.now() - 3_600_000 });

  const response = await fetch(`${urls.controller}/metrics`);
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('content-type'), 'text/plain; version=0.0.4; charset=utf-8');
  const text = await response.text();
  const values = samples(text);
  for (const [name, type] of [['vmferry_migrations_total', 'counter'], ['vmferry_migration_duration_seconds', 'histogram'], ['vmferry_migration_pause_seconds', 'histogram'], ['vmferry_migrations_running', 'gauge'], ['vmferry_hosts', 'gauge']]) {
    assert.match(text, new RegExp(`^# TYPE ${name} ${type}$`, 'm'));
  }
  const expected: Record<string, number> = {
    [`vmferry_build_info{version="${packageVersion}"}`]: 1,
    'vmferry_migrations_total{outcome="completed"}': 2,
    'vmferry_migrations_total{outcome="cancelled"}': 1,
    'vmferry_migrations_total{outcome="failed"}': 1,
    'vmferry_migrations_total{outcome="unresolved"}': 0,
    vmferry_migrations_running: 1,
    'vmferry_migration_duration_seconds_bucket{le="1"}': 1,
    'vmferry_migration_duration_seconds_bucket{le="2"}': 2,
    'vmferry_migration_duration_seconds_bucket{le="5"}': 3,
    'vmferry_migration_duration_seconds_bucket{le="60"}': 3,
    'vmferry_migration_duration_seconds_bucket{le="120"}': 4,
    'vmferry_migration_duration_seconds_bucket{le="+Inf"}': 4,
    vmferry_migration_duration_seconds_sum: 4.2 + 65 + 1.5 + 0.7,
    vmferry_migration_duration_seconds_count: 4,
    'vmferry_migration_pause_seconds_bucket{le="0.01"}': 1,
    'vmferry_migration_pause_seconds_bucket{le="0.1"}': 1,
    'vmferry_migration_pause_seconds_bucket{le="0.25"}': 2,
    'vmferry_migration_pause_seconds_bucket{le="1"}': 3,
    'vmferry_migration_pause_seconds_bucket{le="+Inf"}': 3,
    vmferry_migration_pause_seconds_count: 3,
    vmferry_migration_ram_bytes_total: (100 + 300 + 10 + 0) * MiB,
    vmferry_migration_mirror_bytes_total: (52 + 70 + 0 + 1) * MiB,
    'vmferry_hosts{state="reachable"}': 1,
    'vmferry_hosts{state="unreachable"}': 1,
  };
  for (const [series, value] of Object.entries(expected)) assert.ok(Math.abs((values.get(series) ?? NaN) - value) < 1e-9, `${series}: ${values.get(series)}, expected ${value}`);
  assert.ok(Math.abs((values.get('vmferry_migration_pause_seconds_sum') ?? NaN) - 1.02) < 1e-9, 'pause sum: 0.12 + 0.9 + 0 (the last attempts\' pauses)');
  // Buckets only grow, and +Inf holds every observation.
  for (const name of ['vmferry_migration_duration_seconds', 'vmferry_migration_pause_seconds']) {
    const buckets = [...values].filter(([series]) => series.startsWith(`${name}_bucket`)).map(([, v]) => v);
    assert.deepEqual(buckets, [...buckets].sort((a, b) => a - b), `${name} buckets are cumulative`);
  }
  // The health check reads the same store.
  assert.equal((await health(urls.controller)).body.migrationsRunning, 1);
});

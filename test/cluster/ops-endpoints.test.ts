// The endpoints a service manager and a monitor use (GET /health on every
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
import type { Store } from '../../src/store/store.ts';
import { runProgram } from '../../src/util/run.ts';

const packageVersion = (JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

let dir: string;
let controller: FastifyInstance;
let agent: FastifyInstance;
let storage: StorageServer;
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
  controller = (await buildController({ dbPath: join(dir, 'controller.db'), logger, store: failableStore(new SqliteStore(join(dir, 'controller.db'))) })).app;
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
  const response = await fetch(`${base}/health`);
  return { status: response.status, body: (await response.json()) as Record<string, unknown> };
}

test('GET /health on the controller: ok, with what its store says', async () => {
  const { status, body } = await health(urls.controller);
  assert.equal(status, 200);
  assert.deepEqual({ ...body, uptimeS: typeof body.uptimeS }, { status: 'ok', role: 'controller', version: packageVersion, uptimeS: 'number', store: 'ok', hosts: 1, hostsReachable: 1, migrationsRunning: 0 });
});

test('GET /health on the controller answers 503 with the reason while its store fails, and ok again once it is back', async () => {
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

test('GET /health on an agent: its accelerator and the version of its QEMU binary', async () => {
  const expectedQemu = /version (\S+)/.exec(await runProgram('qemu-system-x86_64', ['--version']))?.[1];
  const { status, body } = await health(urls.agent);
  assert.equal(status, 200);
  assert.deepEqual({ ...body, uptimeS: typeof body.uptimeS }, { status: 'ok', role: 'agent', version: packageVersion, uptimeS: 'number', hostId: 'A', accelerator: 'tcg', qemuVersion: expectedQemu, vms: 0 });
});

test('GET /health on the storage server: its volumes and NBD connections', async () => {
  const { status, body } = await health(urls.storage);
  assert.equal(status, 200);
  assert.deepEqual({ ...body, uptimeS: typeof body.uptimeS }, { status: 'ok', role: 'storage', version: packageVersion, uptimeS: 'number', volumes: 1, nbdConnections: 0 });
});

// A migration whose run ends but whose final record the database refuses (PostgreSQL restarting): the
// controller must not guess its outcome (the guest may run on the destination by then), and must not
// leave it unfinished either, which would refuse every later migration of the VM. It is settled by
// the rules of recovery once the database answers. Fake agents, a real SQLite store behind a wrapper
// that refuses migration updates while "down".
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import type { AgentClient } from '../../src/agent/client.ts';
import type { Inventory } from '../../src/controller/inventory.ts';
import { MigrationService } from '../../src/controller/migrations.ts';
import { VmferryError } from '../../src/errors.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import type { Store } from '../../src/store/store.ts';
import { makeTempDir } from '../support/temp.ts';

let temp: { path: string; remove(): Promise<void> };
let sqlite: SqliteStore;

before(async () => {
  temp = await makeTempDir('migration-bookkeeping');
  sqlite = new SqliteStore(join(temp.path, 'controller.db'));
});
after(() => temp.remove());

const spec = { name: 'web', vcpus: 1, memoryMiB: 128, boot: { kind: 'kernel' as const, kernel: '/k' }, disks: [] };

/** An agent of host `id` that answers every request; `calls` lists them in order. */
function fakeAgent(id: string, calls: string[]): AgentClient {
  const agent = {
    getVm: () => Promise.resolve({ name: 'web', state: 'running', spec }),
    probeSource: () => Promise.resolve({ hostId: 'A', qemuVersion: '7.2', machineType: 'q35', accelerator: 'tcg', localDisks: {} }),
    measureGuestRam: () => Promise.resolve({ dirtyRateBytesPerS: 0, dirtyRateMethod: 'page-sampling', calcTimeS: 1, inUseBytes: 1 << 20, inUseBasis: 'fake' }),
    probeDestination: () =>
      Promise.resolve({ hostId: 'B', address: '127.0.0.1', qemuVersion: '7.2', machineTypes: ['q35'], accelerator: 'tcg', cpu: { model: 'qemu64', unavailableFeatures: [] }, freeMemoryMiB: 4096, poolFreeBytes: 1 << 30, reachableExports: {}, vmNames: [] }),
    request: (method: string, path: string) => {
      calls.push(`${id} ${method} ${path.replace(/^.*\/migrations\/[^/]+\//, '')}`);
      return Promise.resolve({ pauseMs: null });
    },
  };
  return agent as unknown as AgentClient;
}

test("a migration whose final record the database refuses is settled once the database answers, not left unfinished", async () => {
  let down = false;
  // Migration updates fail while down (a restarting PostgreSQL), everything else passes through.
  const store = new Proxy(sqlite, {
    get(target, key: string | symbol) {
      const value = Reflect.get(target, key, target) as unknown;
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        if (key === 'updateMigration' && down) return Promise.reject(new VmferryError('VMF_DATABASE', 'database postgres://127.0.0.1/: connect ECONNREFUSED 127.0.0.1:5432'));
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  }) as Store;
  const calls: string[] = [];
  const inventory = {
    refuseDraining: () => Promise.resolve(),
    locateVm: () => Promise.resolve('A'),
    agent: (id: string) => Promise.resolve(fakeAgent(id, calls)),
  } as unknown as Inventory;
  const service = new MigrationService(store, pino({ level: 'silent' }));
  const tenure = new AbortController();
  service.lead({ store, inventory, signal: tenure.signal });
  try {
    down = true;
    const { id } = await service.start({ vm: 'web', to: 'B', options: {}, dryRun: false });
    // The run fails at its first phase write and rolls back; its final write is refused too.
    await sleep(500);
    assert.equal((await sqlite.getMigration(id as string))?.phase, 'pending');
    down = false;
    const deadline = Date.now() + 10_000;
    let phase = '';
    while ((phase = (await sqlite.getMigration(id as string))?.phase ?? '') !== 'failed') {
      assert.ok(Date.now() < deadline, `migration still ${phase} 10 s after the database came back`);
      await sleep(50);
    }
    const record = await sqlite.getMigration(id as string);
    assert.match(record?.report?.recovery ?? '', /its controller could not finish it .*; rolled back: web runs on A/);
    assert.ok(calls.includes('A POST source/rollback'), `the source was rolled back: ${calls.join(', ')}`);
    assert.equal(await sqlite.activeMigration('web'), undefined, 'the VM may migrate again');
  } finally {
    tenure.abort();
    await service.drain();
  }
});

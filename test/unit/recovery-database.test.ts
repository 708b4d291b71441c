// The controller's recovery (src/controller/recovery.ts) while its database does not answer, as during a
// PostgreSQL restart: a failed read is asked again, never taken for "nothing to settle", so the migration
// ends settled (here rolled back) once the database is back. Fake halves, a real SQLite store behind a
// wrapper that fails the first reads as a restarting server would.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pino from 'pino';
import type { Inventory } from '../../src/controller/inventory.ts';
import { settleUnfinishedMigrations, settleUntilDone, type SettlingHalves } from '../../src/controller/recovery.ts';
import { VmferryError } from '../../src/errors.ts';
import { defaultMigrationOptions, planMigration } from '../../src/migration/plan.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import type { Store } from '../../src/store/store.ts';
import { makeTempDir } from '../support/temp.ts';

let temp: { path: string; remove(): Promise<void> };
let sqlite: SqliteStore;
const logger = pino({ level: 'silent' });
const noInventory = {} as Inventory;

before(async () => {
  temp = await makeTempDir('recovery-database');
  sqlite = new SqliteStore(join(temp.path, 'controller.db'));
});
after(() => temp.remove());

const plan = planMigration(
  { name: 'web', vcpus: 1, memoryMiB: 128, boot: { kind: 'kernel', kernel: '/k' }, disks: [] },
  { hostId: 'A', qemuVersion: '7.2', machineType: 'q35', accelerator: 'tcg', localDisks: {} },
  { hostId: 'B', address: '127.0.0.1', qemuVersion: '7.2', machineTypes: ['q35'], accelerator: 'tcg', cpu: { model: 'qemu64', unavailableFeatures: [] }, freeMemoryMiB: 4096, poolFreeBytes: 1 << 30, reachableExports: {}, vmNames: [] },
  defaultMigrationOptions,
);

/** `sqlite`, whose first `failures` calls of `read` fail as a query to a restarting PostgreSQL does. */
function restartingStore(read: 'getMigration' | 'unfinishedMigrations', failures: number): Store {
  let left = failures;
  const failing = new Proxy(sqlite, {
    get(target, key: string | symbol) {
      const value = Reflect.get(target, key, target) as unknown;
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        if (key === read && left-- > 0) return Promise.reject(new VmferryError('VMF_DATABASE', 'database postgres://127.0.0.1/: connect ECONNREFUSED 127.0.0.1:5432'));
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return failing;
}

function rollingBackHalves(): { calls: string[]; halves: () => Promise<SettlingHalves> } {
  const calls: string[] = [];
  const halves: SettlingHalves = {
    source: {
      hostId: 'A',
      migrationInfo: () => Promise.resolve({ status: 'active' }),
      retire: () => Promise.resolve(void calls.push('src.retire')),
      rollback: () => Promise.resolve(void calls.push('src.rollback')).then(() => ({ pauseMs: null })),
    },
    destination: {
      hostId: 'B',
      fate: () => Promise.resolve('never-ran'),
      resume: () => Promise.resolve(void calls.push('dst.resume')).then(() => ({ resumedAtUs: null })),
      rollback: () => Promise.resolve(void calls.push('dst.rollback')),
    },
  };
  return { calls, halves: () => Promise.resolve(halves) };
}

async function storedMigration(id: string): Promise<void> {
  await sqlite.createMigration({ id, vm: 'web', from: 'A', to: 'B', phase: 'migrating', plan, report: null, createdAt: Date.now(), updatedAt: Date.now() });
}

test('settling a migration whose first read fails (the database restarting): asked again, then rolled back', async () => {
  await storedMigration('db1');
  const { calls, halves } = rollingBackHalves();
  await settleUntilDone('db1', restartingStore('getMigration', 1), noInventory, logger, AbortSignal.timeout(30_000), 'a new leader took over (epoch 2)', halves);
  const record = await sqlite.getMigration('db1');
  assert.equal(record?.phase, 'failed', 'the migration is settled, not left migrating');
  assert.deepEqual(calls, ['dst.rollback', 'src.rollback']);
  assert.match(record?.report?.recovery ?? '', /rolled back: web runs on A/);
});

test("a new tenure whose list of unfinished migrations fails at first (the database restarting): asked again, each one settled", async () => {
  await storedMigration('db2');
  const { calls, halves } = rollingBackHalves();
  await settleUnfinishedMigrations(restartingStore('unfinishedMigrations', 1), noInventory, logger, AbortSignal.timeout(30_000), 'a new leader took over (epoch 3)', halves);
  assert.equal((await sqlite.getMigration('db2'))?.phase, 'failed', 'the migration is settled, not left migrating');
  assert.deepEqual(calls, ['dst.rollback', 'src.rollback']);
});

// The controller's recovery (src/controller/recovery.ts) of a migration stored in a post-copy phase, or
// unresolved after one: the source is never rolled back, whatever the destination says; the migration
// finishes once the source reports its RAM migration completed. Fake halves, a real SQLite store.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import type { Inventory } from '../../src/controller/inventory.ts';
import { settleUntilDone, type SettlingHalves } from '../../src/controller/recovery.ts';
import type { DestinationFate } from '../../src/migration/no-return.ts';
import type { MigrationPhase, MigrationReport } from '../../src/migration/phases.ts';
import { defaultMigrationOptions, planMigration } from '../../src/migration/plan.ts';
import type { MigrationStatus } from '../../src/qmp/commands.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { makeTempDir } from '../support/temp.ts';

let temp: { path: string; remove(): Promise<void> };
let store: SqliteStore;
const logger = pino({ level: 'silent' });
const noInventory = {} as Inventory;

before(async () => {
  temp = await makeTempDir('recovery-postcopy');
  store = new SqliteStore(join(temp.path, 'controller.db'));
});
after(() => temp.remove());

const plan = planMigration(
  { name: 'web', vcpus: 1, memoryMiB: 128, boot: { kind: 'kernel', kernel: '/k' }, disks: [] },
  { hostId: 'A', qemuVersion: '7.2', machineType: 'q35', accelerator: 'tcg', localDisks: {} },
  { hostId: 'B', address: '127.0.0.1', qemuVersion: '7.2', machineTypes: ['q35'], accelerator: 'tcg', cpu: { model: 'qemu64', unavailableFeatures: [] }, freeMemoryMiB: 4096, poolFreeBytes: 1 << 30, reachableExports: {}, vmNames: [] },
  { ...defaultMigrationOptions, ramMode: 'postcopy' },
);

async function storedMigration(id: string, phase: MigrationPhase, report: MigrationReport | null = null): Promise<void> {
  await store.createMigration({ id, vm: 'web', from: 'A', to: 'B', phase, plan, report, createdAt: Date.now(), updatedAt: Date.now() });
}

/** Halves that answer from `state` and log every call. */
function fakeHalves(state: { sourceStatus: MigrationStatus; fate: DestinationFate }) {
  const calls: string[] = [];
  const halves: SettlingHalves = {
    source: {
      hostId: 'A',
      migrationInfo: () => Promise.resolve({ status: state.sourceStatus }),
      retire: () => Promise.resolve(void calls.push('src.retire')),
      rollback: () => {
        calls.push('src.rollback');
        return Promise.resolve({ pauseMs: null });
      },
    },
    destination: {
      hostId: 'B',
      fate: () => Promise.resolve(state.fate),
      resume: () => {
        calls.push('dst.resume');
        return Promise.resolve({ resumedAtUs: null });
      },
      rollback: () => Promise.resolve(void calls.push('dst.rollback')),
    },
  };
  return { calls, halves: () => Promise.resolve(halves) };
}

async function waitForPhase(id: string, phase: MigrationPhase): Promise<void> {
  const deadline = Date.now() + 10_000;
  while ((await store.getMigration(id))?.phase !== phase) {
    assert.ok(Date.now() < deadline, `migration ${id} did not reach ${phase}`);
    await sleep(20);
  }
}

test('a controller that restarts in postcopy-active: unresolved while RAM is in flight, never rolled back, then completed', async () => {
  await storedMigration('pc1', 'postcopy-active');
  const state = { sourceStatus: 'postcopy-paused' as MigrationStatus, fate: 'guest-ran' as DestinationFate };
  const { calls, halves } = fakeHalves(state);
  const stop = new AbortController();
  const settling = settleUntilDone('pc1', store, noInventory, logger, stop.signal, 'the controller restarted', halves);
  await waitForPhase('pc1', 'unresolved');
  const unresolved = await store.getMigration('pc1');
  assert.match(unresolved?.report?.error?.message ?? '', /post-copy had begun, so web's memory is split between A and B and A never runs it again/);
  assert.deepEqual(calls, [], 'nothing rolled back, nothing retired while B still needs pages from A');
  state.sourceStatus = 'completed';
  await settling;
  assert.equal((await store.getMigration('pc1'))?.phase, 'completed');
  assert.deepEqual(calls, ['src.retire']);
});

test('an unresolved migration whose history holds post-copy is never rolled back, even when the destination says its QEMU is gone', async () => {
  const report = { phases: [{ phase: 'postcopy-started', startedAt: 0, durationMs: 0 }] } as unknown as MigrationReport;
  await storedMigration('pc2', 'unresolved', report);
  const { calls, halves } = fakeHalves({ sourceStatus: 'completed', fate: 'gone' });
  const stop = new AbortController();
  const settling = settleUntilDone('pc2', store, noInventory, logger, stop.signal, 'a fault came', halves);
  await sleep(2_500);
  stop.abort();
  await settling;
  assert.equal((await store.getMigration('pc2'))?.phase, 'unresolved');
  assert.deepEqual(calls, []);
});

test('post-copy that delivered all of RAM to a destination never continued: the destination is continued, the source retired', async () => {
  await storedMigration('pc3', 'postcopy-started');
  const { calls, halves } = fakeHalves({ sourceStatus: 'completed', fate: 'never-ran' });
  await settleUntilDone('pc3', store, noInventory, logger, new AbortController().signal, 'the controller restarted', halves);
  assert.equal((await store.getMigration('pc3'))?.phase, 'completed');
  assert.deepEqual(calls, ['dst.resume', 'src.retire']);
});

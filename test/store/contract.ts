/**
 * The `Store` contract (src/store/store.ts), as tests any engine must pass:
 * test/store/sqlite.test.ts and test/store/postgres.test.ts run them, each on
 * its own engine. `open(name)` opens the store called `name`; opening the same
 * name again (after closing) must see what was written before.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import type { DrainStatus, MigrationRecord, Store } from '../../src/store/store.ts';

export type OpenStore = (name: string) => Promise<Store>;

let names = 0;

/** Opens a new store for one test and closes it afterwards, pass or fail. */
async function withStore(open: OpenStore, body: (store: Store, name: string) => Promise<void>): Promise<void> {
  const name = `contract${++names}`;
  const store = await open(name);
  try {
    await body(store, name);
  } finally {
    await store.close();
  }
}

// A stand-in plan: the store keeps it as an opaque JSON document.
const plan = { vm: 'web', disks: [{ id: 'vda', operation: 'mirror' }], options: { ramMode: 'live', maxDowntimeMs: 300 } } as unknown as MigrationRecord['plan'];

function migration(id: string, vm: string, createdAt: number, phase: MigrationRecord['phase'] = 'pending'): MigrationRecord {
  return { id, vm, from: 'A', to: 'B', phase, plan, report: null, createdAt, updatedAt: createdAt };
}

const report: NonNullable<MigrationRecord['report']> = {
  vm: 'web',
  from: 'A',
  to: 'B',
  outcome: 'failed',
  // A NUL, quotes and non-ASCII: what a QEMU error message may carry.
  error: { code: 'VMF_MIGRATION_FAILED', message: 'qemu said "no\u0000pe" — déjà vu' },
  disks: [{ id: 'vda', operation: 'mirror', bytesSent: 2 ** 40 + 1, virtualSize: 2 ** 41 }],
  ram: { transferredBytes: 1, totalBytes: 2, passes: 3, memoryCompared: false },
  phases: [],
} as unknown as NonNullable<MigrationRecord['report']>;

export function storeContract(engine: string, open: OpenStore): void {
  test(`${engine}: hosts are upserted, listed by id, and keep their accelerator only when reported`, () =>
    withStore(open, async (store) => {
      await store.upsertHost({ id: 'B', url: 'http://10.0.0.2:10801', address: '10.0.0.2', lastSeen: 1000 });
      await store.upsertHost({ id: 'A', url: 'http://10.0.0.1:10801', address: '10.0.0.1', lastSeen: 2000, accelerator: 'tcg', acceleratorReason: 'KVM unusable: no /dev/kvm' });
      await store.upsertHost({ id: 'B', url: 'http://10.0.0.3:10801', address: '10.0.0.3', lastSeen: 1_764_500_000_000, accelerator: 'kvm' });
      assert.deepEqual(await store.listHosts(), [
        { id: 'A', url: 'http://10.0.0.1:10801', address: '10.0.0.1', lastSeen: 2000, accelerator: 'tcg', acceleratorReason: 'KVM unusable: no /dev/kvm' },
        { id: 'B', url: 'http://10.0.0.3:10801', address: '10.0.0.3', lastSeen: 1_764_500_000_000, accelerator: 'kvm' },
      ]);
      assert.deepEqual(await store.getHost('A'), (await store.listHosts())[0]);
      assert.equal(await store.getHost('C'), undefined);
    }));

  test(`${engine}: a VM's location is set, moved and deleted`, () =>
    withStore(open, async (store) => {
      await store.setVmLocation({ name: 'web', hostId: 'A' });
      await store.setVmLocation({ name: 'web', hostId: 'B' });
      assert.deepEqual(await store.getVmLocation('web'), { name: 'web', hostId: 'B' });
      await store.deleteVmLocation('web');
      assert.equal(await store.getVmLocation('web'), undefined);
      await store.deleteVmLocation('web');
    }));

  test(`${engine}: a host is marked draining once, survives its heartbeats, and is undrained`, () =>
    withStore(open, async (store) => {
      await store.setHostDraining('B', true);
      await store.setHostDraining('A', true);
      await store.setHostDraining('A', true);
      await store.upsertHost({ id: 'A', url: 'http://a', address: '10.0.0.1', lastSeen: 1 });
      assert.deepEqual(await store.drainingHosts(), ['A', 'B']);
      await store.setHostDraining('A', false);
      await store.setHostDraining('A', false);
      assert.deepEqual(await store.drainingHosts(), ['B']);
    }));

  test(`${engine}: a drain's status is kept as last saved, and drains list newest first`, () =>
    withStore(open, async (store) => {
      const drain = (id: string, startedAt: number, state: DrainStatus['state']): DrainStatus => ({
        id, host: 'A', to: null, parallel: 2, bandwidthMiBs: 8, state, startedAt, endedAt: state === 'running' ? null : startedAt + 10,
        vms: [{ vm: 'web', state: state === 'running' ? 'migrating' : 'completed', to: 'B', migrationId: 'm1', downtimeMs: null }], transfer: null,
      });
      await store.saveDrain(drain('d1', 1000, 'running'));
      await store.saveDrain(drain('d2', 2000, 'running'));
      await store.saveDrain(drain('d1', 1000, 'done'));
      assert.deepEqual(await store.getDrain('d1'), drain('d1', 1000, 'done'));
      assert.equal(await store.getDrain('nope'), undefined);
      assert.deepEqual((await store.listDrains(10)).map((d) => [d.id, d.state]), [['d2', 'running'], ['d1', 'done']]);
      assert.deepEqual((await store.listDrains(1)).map((d) => d.id), ['d2']);
    }));

  test(`${engine}: a migration keeps its plan and report as written, and its phase and report change independently`, () =>
    withStore(open, async (store) => {
      await store.createMigration(migration('m1', 'web', 1000));
      assert.deepEqual(await store.getMigration('m1'), migration('m1', 'web', 1000));
      const before = Date.now();
      await store.updateMigration('m1', { phase: 'mirroring' });
      await store.updateMigration('m1', { report });
      const stored = await store.getMigration('m1');
      assert.equal(stored?.phase, 'mirroring');
      assert.deepEqual(stored?.report, report);
      assert.deepEqual(stored?.plan, plan);
      assert.ok((stored?.updatedAt ?? 0) >= before, 'updatedAt moves with each change');
      assert.equal(stored?.createdAt, 1000);
      assert.equal(await store.getMigration('nope'), undefined);
    }));

  test(`${engine}: migrations list newest first; unfinished ones oldest first, same-millisecond ones in the order created`, () =>
    withStore(open, async (store) => {
      await store.createMigration(migration('m-old', 'a', 1000, 'completed'));
      await store.createMigration(migration('m-2', 'b', 2000, 'migrating'));
      await store.createMigration(migration('m-1', 'c', 2000, 'mirroring'));
      await store.createMigration(migration('m-0', 'd', 1500, 'unresolved'));
      await store.createMigration(migration('m-new', 'e', 3000, 'failed'));
      assert.deepEqual((await store.listMigrations(10)).map((m) => m.id), ['m-new', 'm-1', 'm-2', 'm-0', 'm-old']);
      assert.deepEqual((await store.listMigrations(2)).map((m) => m.id), ['m-new', 'm-1']);
      assert.deepEqual((await store.unfinishedMigrations()).map((m) => m.id), ['m-0', 'm-2', 'm-1']);
    }));

  test(`${engine}: a VM's active migration is the one not in a final phase`, () =>
    withStore(open, async (store) => {
      await store.createMigration(migration('done', 'web', 1000, 'completed'));
      assert.equal(await store.activeMigration('web'), undefined);
      await store.createMigration(migration('now', 'web', 2000, 'migrating'));
      assert.equal((await store.activeMigration('web'))?.id, 'now');
      assert.equal(await store.activeMigration('db'), undefined);
      await store.updateMigration('now', { phase: 'failed' });
      assert.equal(await store.activeMigration('web'), undefined);
    }));

  test(`${engine}: events are numbered from 1 per migration, also when appended concurrently, and read after a seq`, () =>
    withStore(open, async (store) => {
      await store.createMigration(migration('m1', 'web', 1000));
      await store.createMigration(migration('m2', 'db', 1000));
      const count = 40;
      await Promise.all(
        Array.from({ length: count }, (_, i) => store.appendEvent(i % 2 ? 'm2' : 'm1', { type: 'escalation', action: 'retry', detail: `event ${i}` })),
      );
      for (const [id, parity] of [['m1', 0], ['m2', 1]] as const) {
        const events = await store.eventsSince(id, 0);
        assert.deepEqual(events.map((e) => e.seq), Array.from({ length: count / 2 }, (_, i) => i + 1), `${id}: seq 1..${count / 2}, no gap, no repeat`);
        const details = events.map((e) => (e.event.type === 'escalation' ? Number(e.event.detail.split(' ')[1]) : -1));
        assert.deepEqual([...details].sort((a, b) => a - b), Array.from({ length: count / 2 }, (_, i) => 2 * i + parity), `${id}: every event kept once`);
      }
      const later = await store.eventsSince('m1', 18);
      assert.deepEqual(later.map((e) => e.seq), [19, 20]);
      assert.ok(later.every((e) => typeof e.at === 'number' && e.at > 0));
      assert.deepEqual(await store.eventsSince('m1', 20), []);
    }));

  test(`${engine}: an event for a migration that does not exist is refused`, () =>
    withStore(open, async (store) => {
      await assert.rejects(store.appendEvent('ghost', { type: 'phase', phase: 'migrating', at: 1 }), (err) => hasCode(err, 'VMF_NOT_FOUND'));
      assert.deepEqual(await store.eventsSince('ghost', 0), []);
    }));

  test(`${engine}: what was written is there after the store is closed and opened again`, async () => {
    let name = '';
    await withStore(open, async (store, storeName) => {
      name = storeName;
      await store.upsertHost({ id: 'A', url: 'http://10.0.0.1:10801', address: '10.0.0.1', lastSeen: 1000 });
      await store.setVmLocation({ name: 'web', hostId: 'A' });
      await store.createMigration(migration('m1', 'web', 1000));
      await store.updateMigration('m1', { phase: 'resume-sent' });
      await store.appendEvent('m1', { type: 'phase', phase: 'resume-sent', at: 1 });
    });
    const again = await open(name);
    try {
      assert.equal((await again.listHosts()).length, 1);
      assert.deepEqual(await again.getVmLocation('web'), { name: 'web', hostId: 'A' });
      assert.deepEqual((await again.unfinishedMigrations()).map((m) => [m.id, m.phase]), [['m1', 'resume-sent']]);
      // Numbering goes on after a reopen, not from 1 again.
      await again.appendEvent('m1', { type: 'phase', phase: 'completed', at: 2 });
      assert.deepEqual((await again.eventsSince('m1', 0)).map((e) => e.seq), [1, 2]);
    } finally {
      await again.close();
    }
  });
}

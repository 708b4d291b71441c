// A destination that cannot tell whether its guest ran (its QEMU and its agent died after the resume
// was sent) and the operator's choice that settles it (src/controller/resolve.ts), without QEMU: the
// agent's registry over a data directory as a power loss left it, and the controller's logic over
// fake halves and a real SQLite store.
import assert from 'node:assert/strict';
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { writeIncomingRecord, type IncomingRecord } from '../../src/agent/half-records.ts';
import { RequestGuard } from '../../src/agent/request-guard.ts';
import { VmRegistry } from '../../src/agent/vm-registry.ts';
import type { Inventory } from '../../src/controller/inventory.ts';
import { settleUntilDone, type SettlingHalves } from '../../src/controller/recovery.ts';
import { resolveMigration, type ResolvingHalves } from '../../src/controller/resolve.ts';
import { hasCode, type ErrorCode } from '../../src/errors.ts';
import type { DestinationFate } from '../../src/migration/no-return.ts';
import type { MigrationPhase, MigrationReport } from '../../src/migration/phases.ts';
import { defaultMigrationOptions, planMigration } from '../../src/migration/plan.ts';
import { validateVmSpec } from '../../src/qemu/spec.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import type { MigrationRecord } from '../../src/store/store.ts';
import { makeTempDir } from '../support/temp.ts';

let temp: { path: string; remove(): Promise<void> };
let store: SqliteStore;
const logger = pino({ level: 'silent' });

before(async () => {
  temp = await makeTempDir('resolve');
  store = new SqliteStore(join(temp.path, 'controller.db'));
});
after(() => temp.remove());

/** B's data directory as a power loss after the cont left it: the record of `phase`, the mirrored image, no spec.json, no QEMU. */
async function registryAfterPowerLoss(dataDir: string, phase: IncomingRecord['phase']): Promise<VmRegistry> {
  const image = join(dataDir, 'pool', 'web-root.qcow2');
  await mkdir(join(dataDir, 'pool'), { recursive: true });
  await mkdir(join(dataDir, 'vms', 'web', 'qemu'), { recursive: true });
  await writeFile(image, 'the guest disk as its QEMU left it');
  const spec = validateVmSpec({ name: 'web', vcpus: 1, memoryMiB: 128, boot: { kind: 'kernel', kernel: '/boot/vmlinuz' }, disks: [{ id: 'root', source: { kind: 'file', path: image, format: 'qcow2' } }] });
  await writeIncomingRecord(join(dataDir, 'vms', 'web'), { migration: 'm1', phase, ...(phase === 'prepared' ? {} : { spec }) });
  const guard = await RequestGuard.create({ trustedDirs: [], poolDir: join(dataDir, 'pool'), vmsDir: join(dataDir, 'vms'), storageNbd: undefined });
  const registry = new VmRegistry('B', dataDir, logger, { accelerator: 'tcg', reason: 'test' }, guard);
  await registry.init();
  return registry;
}

test('an agent back from a power loss after the cont cannot tell whether its guest ran; chosen, it takes the VM back from its quarantine, stopped', async () => {
  const dataDir = join(temp.path, 'resume-sent');
  const registry = await registryAfterPowerLoss(dataDir, 'resume-sent');
  assert.deepEqual(registry.names(), [], 'nothing is a VM here before someone decides');
  assert.equal((await registry.quarantine.list()).length, 1, 'its directory and image wait in the quarantine');
  assert.equal(await registry.incomingFate('m1'), 'unknown');

  const vm = await registry.takeBackIncoming('m1');
  assert.deepEqual([vm.name, vm.state, vm.migrating], ['web', 'stopped', false]);
  assert.deepEqual(await readdir(join(dataDir, 'pool')), ['web-root.qcow2'], 'its disk is back in the pool');
  assert.deepEqual(await registry.quarantine.list(), []);
  assert.equal(await registry.incomingFate('m1'), 'guest-ran', 'from now on the guest lives here');
  assert.equal((await registry.takeBackIncoming('m1')).state, 'stopped', 'asked again, the same answer');
});

test('a half that was never resumed is gone, and never becomes a VM: its disks may be incomplete copies', async () => {
  const registry = await registryAfterPowerLoss(join(temp.path, 'prepared'), 'prepared');
  assert.equal(await registry.incomingFate('m1'), 'gone');
  await assert.rejects(registry.takeBackIncoming('m1'), (err) => hasCode(err, 'VMF_CONFLICT') && /never resumed on B: its disks in quarantine .* may be incomplete copies/.test((err as Error).message));
  await assert.rejects(registry.takeBackIncoming('m2'), (err) => hasCode(err, 'VMF_NOT_FOUND') && /B holds nothing of migration m2/.test((err as Error).message));
});

const plan = planMigration(
  { name: 'web', vcpus: 1, memoryMiB: 128, boot: { kind: 'kernel', kernel: '/k' }, disks: [] },
  { hostId: 'A', qemuVersion: '7.2', machineType: 'q35', accelerator: 'tcg', localDisks: {} },
  { hostId: 'B', address: '127.0.0.1', qemuVersion: '7.2', machineTypes: ['q35'], accelerator: 'tcg', cpu: { model: 'qemu64', unavailableFeatures: [] }, freeMemoryMiB: 4096, poolFreeBytes: 1 << 30, reachableExports: {}, vmNames: [] },
  defaultMigrationOptions,
);

async function storedMigration(id: string, phase: MigrationPhase, history: MigrationPhase[] = []): Promise<MigrationRecord> {
  const report = history.length ? ({ phases: history.map((p) => ({ phase: p, startedAt: 0, durationMs: 0 })) } as unknown as MigrationReport) : null;
  await store.createMigration({ id, vm: 'web', from: 'A', to: 'B', phase, plan, report, createdAt: Date.now(), updatedAt: Date.now() });
  return (await store.getMigration(id)) as MigrationRecord;
}

/** Halves that answer `fate` and log every call that acts. */
function fakeHalves(fate: DestinationFate) {
  const calls: string[] = [];
  const act = (call: string) => () => Promise.resolve(void calls.push(call));
  const halves: ResolvingHalves & SettlingHalves = {
    source: {
      hostId: 'A',
      migrationInfo: () => Promise.resolve({ status: 'completed' }),
      retire: (keep) => Promise.resolve(void calls.push(`src.retire(keep=${keep})`)),
      rollback: () => Promise.resolve({ pauseMs: (calls.push('src.rollback'), null) }),
      localDisks: () => Promise.resolve(['/data/pool/web-root.qcow2']),
    },
    destination: {
      hostId: 'B',
      fate: () => Promise.resolve(fate),
      resume: () => Promise.resolve({ resumedAtUs: (calls.push('dst.resume'), null) }),
      rollback: act('dst.rollback'),
      takeBack: () => Promise.resolve({ name: 'web', host: 'B', state: 'stopped', pid: null, migrating: (calls.push('dst.takeBack'), false), blockJobs: [], spec: plan as never }),
    },
  };
  return { calls, halves };
}

test('the controller stores why and the choices once, stops asking, and acts on nothing until an operator decides', async () => {
  await storedMigration('u1', 'resume-sent');
  const { calls, halves } = fakeHalves('unknown');
  // Resolves by itself: a loop that kept asking would only ever hear the same answer.
  await settleUntilDone('u1', store, {} as Inventory, logger, new AbortController().signal, 'the controller restarted', () => Promise.resolve(halves));
  const waiting = (await store.getMigration('u1')) as MigrationRecord;
  assert.equal(waiting.phase, 'unresolved');
  assert.match(waiting.report?.error?.message ?? '', /B cannot tell whether the guest ran there: its QEMU and its agent died after the resume was sent/);
  assert.match(waiting.report?.error?.message ?? '', /vmferry migration resolve u1 --run-on A \(the paused guest resumes there.*\) or vmferry migration resolve u1 --run-on B/);
  assert.deepEqual(calls, []);
  // A controller that restarts asks once more and writes nothing new.
  const events = (await store.eventsSince('u1', 0)).length;
  await settleUntilDone('u1', store, {} as Inventory, logger, new AbortController().signal, 'the controller restarted', () => Promise.resolve(halves));
  assert.equal((await store.eventsSince('u1', 0)).length, events);
  assert.equal((await store.getMigration('u1'))?.updatedAt, waiting.updatedAt);
});

test('--run-on A: B drops its half first, then the paused source resumes; the migration fails, saying what the choice risks', async () => {
  const record = await storedMigration('a1', 'unresolved', ['resume-sent', 'unresolved']);
  const { calls, halves } = fakeHalves('unknown');
  const settled = await resolveMigration(record, 'A', store, halves, logger);
  assert.deepEqual(calls, ['dst.rollback', 'src.rollback']);
  assert.equal(settled.phase, 'failed');
  assert.match(settled.report?.recovery ?? '', /an operator chose A .*: web resumed on A from where it paused\. If the guest did run on B .* is lost .*kept in its quarantine \(vmferry host quarantine list B\)/);
});

test('--run-on B: B takes the VM back stopped, then A stops its QEMU keeping its disks; the migration completes and the VM is placed on B', async () => {
  const record = await storedMigration('b1', 'unresolved', ['resume-sent', 'unresolved']);
  const { calls, halves } = fakeHalves('unknown');
  const settled = await resolveMigration(record, 'B', store, halves, logger);
  assert.deepEqual(calls, ['dst.takeBack', 'src.retire(keep=true)']);
  assert.equal(settled.phase, 'completed');
  assert.equal((await store.getVmLocation('web'))?.hostId, 'B');
  assert.match(settled.report?.recovery ?? '', /web is kept on B, stopped.*vmferry vm start web.*A's QEMU was stopped and its RAM discarded; its local disks are kept on A \(\/data\/pool\/web-root\.qcow2\) in its quarantine \(vmferry host quarantine list A\)/);
  // Cut off after the take-back, the choice is repeated: B now says the guest ran there, which does not refuse it.
  const repeated = fakeHalves('guest-ran');
  assert.equal((await resolveMigration(await storedMigration('b2', 'unresolved', ['resume-sent', 'unresolved']), 'B', store, repeated.halves, logger)).phase, 'completed');
  assert.deepEqual(repeated.calls, ['dst.takeBack', 'src.retire(keep=true)']);
});

test('bad choices are refused, naming the problem, and touch nothing', async () => {
  const refused = async (record: MigrationRecord, runOn: string, fate: DestinationFate, code: ErrorCode, message: RegExp): Promise<void> => {
    const { calls, halves } = fakeHalves(fate);
    await assert.rejects(resolveMigration(record, runOn, store, halves, logger), (err) => hasCode(err, code) && message.test((err as Error).message));
    assert.deepEqual(calls, []);
  };
  const unresolved = await storedMigration('r1', 'unresolved', ['resume-sent', 'unresolved']);
  await refused(await storedMigration('r2', 'completed'), 'A', 'unknown', 'VMF_CONFLICT', /migration r2 is completed, not unresolved/);
  await refused(unresolved, 'C', 'unknown', 'VMF_INVALID_ARGUMENT', /--run-on C is neither side of migration r1: choose A \(its source\) or B \(its destination\)/);
  await refused(unresolved, 'A', 'guest-ran', 'VMF_CONFLICT', /B answers that the guest ran there: vmferry settles migration r1 by that itself/);
  await refused(unresolved, 'B', 'gone', 'VMF_CONFLICT', /B answers that no QEMU of this migration ran the guest there/);
  const postcopy = await storedMigration('r3', 'unresolved', ['postcopy-active', 'unresolved']);
  await refused(postcopy, 'A', 'unknown', 'VMF_CONFLICT', /post-copy had begun in migration r3, so web's memory is split between A and B: A never runs it again; only --run-on B/);
  const { calls, halves } = fakeHalves('unknown');
  assert.equal((await resolveMigration(postcopy, 'B', store, halves, logger)).phase, 'completed', 'B may still be chosen after post-copy');
  assert.deepEqual(calls, ['dst.takeBack', 'src.retire(keep=true)']);
});

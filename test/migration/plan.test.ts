import assert from 'node:assert/strict';
import { test } from 'node:test';
import { defaultMigrationOptions, exportKey, planMigration, type DestinationFacts, type SourceFacts } from '../../src/migration/plan.ts';
import type { DiskSpec, VmSpec } from '../../src/qemu/spec.ts';

const gib = 1024 ** 3;
const storage = { type: 'inet', host: '127.0.0.1', port: 10809 } as const;

const localRoot: DiskSpec = { id: 'root', source: { kind: 'file', path: '/pool/a/root.qcow2', format: 'qcow2' } };
const localScratch: DiskSpec = { id: 'scratch', source: { kind: 'file', path: '/pool/a/scratch.raw', format: 'raw' } };
const sharedData: DiskSpec = { id: 'data', source: { kind: 'nbd', server: storage, export: 'data' } };
const sharedIso: DiskSpec = { id: 'iso', source: { kind: 'nbd', server: storage, export: 'iso' }, readOnly: true };

function vm(disks: DiskSpec[], memoryMiB = 512): VmSpec {
  return { name: 'web', vcpus: 1, memoryMiB, boot: { kind: 'kernel', kernel: '/k' }, disks };
}

const source: SourceFacts = {
  hostId: 'A',
  qemuVersion: '7.2.0',
  machineType: 'pc-q35-7.2',
  accelerator: 'tcg',
  localDisks: {
    root: { virtualSize: 2 * gib, allocatedBytes: 600 * 1024 ** 2, backingFile: undefined },
    scratch: { virtualSize: gib, allocatedBytes: 100 * 1024 ** 2, backingFile: '/images/base.raw' },
  },
};

function destination(overrides: Partial<DestinationFacts> = {}): DestinationFacts {
  return {
    hostId: 'B',
    qemuVersion: '7.2.0',
    machineTypes: ['pc-q35-7.2', 'pc-i440fx-7.2'],
    freeMemoryMiB: 8192,
    poolFreeBytes: 100 * gib,
    reachableExports: { [exportKey(storage, 'data')]: 4 * gib, [exportKey(storage, 'iso')]: gib },
    vmNames: [],
    ...overrides,
  };
}

const operations = (plan: ReturnType<typeof planMigration>): [string, string, number][] =>
  plan.disks.map((d) => [d.id, d.operation, d.bytesToCopy]);

test('local disks only: every disk is mirrored with its allocated bytes to copy', () => {
  const plan = planMigration(vm([localRoot, localScratch]), source, destination(), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, []);
  assert.deepEqual(operations(plan), [
    ['root', 'mirror', 600 * 1024 ** 2],
    ['scratch', 'mirror', 100 * 1024 ** 2],
  ]);
});

test('a standalone image mirrors its top layer only; an overlay mirrors its whole chain', () => {
  const plan = planMigration(vm([localRoot, localScratch]), source, destination(), defaultMigrationOptions);
  assert.deepEqual(plan.disks.map((d) => [d.id, d.mirrorSync]), [['root', 'top'], ['scratch', 'full']]);
});

test('shared disks only: re-attached, nothing to copy', () => {
  const plan = planMigration(vm([sharedData]), source, destination(), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, []);
  assert.deepEqual(operations(plan), [['data', 'reattach', 0]]);
  assert.equal(plan.disks[0]?.virtualSize, 4 * gib);
});

test('mixed disks and read-only shared media: one operation per disk', () => {
  const plan = planMigration(vm([localRoot, sharedData, sharedIso, localScratch]), source, destination(), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, []);
  assert.deepEqual(operations(plan), [
    ['root', 'mirror', 600 * 1024 ** 2],
    ['data', 'reattach', 0],
    ['iso', 'reattach', 0],
    ['scratch', 'mirror', 100 * 1024 ** 2],
  ]);
  assert.match(plan.disks[2]?.reason ?? '', /^read-only shared volume/);
});

test('a shared volume the destination cannot reach is refused with the reason', () => {
  const plan = planMigration(vm([localRoot, sharedData]), source, destination({ reachableExports: {} }), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, ['disk data: B cannot reach shared volume nbd://127.0.0.1:10809/data']);
});

test('not enough pool space on the destination is refused', () => {
  const plan = planMigration(vm([localRoot]), source, destination({ poolFreeBytes: 100 * 1024 ** 2 }), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, ["B's pool has 100.0 MiB free; the local disks need 600.0 MiB"]);
});

test('not enough memory on the destination is refused', () => {
  const plan = planMigration(vm([sharedData], 4096), source, destination({ freeMemoryMiB: 2048 }), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, ['B has 2048 MiB of free memory; the VM needs 4160 MiB']);
});

test('another machine type, a name already taken, the same host: each refused', () => {
  const plan = planMigration(
    vm([sharedData]),
    source,
    destination({ hostId: 'A', machineTypes: ['pc-q35-8.0'], vmNames: ['web'], qemuVersion: '8.0.0' }),
    defaultMigrationOptions,
  );
  assert.deepEqual(plan.refusals, [
    'the VM already runs on A',
    'A already has a VM named web',
    'A (QEMU 8.0.0) does not support machine type pc-q35-7.2',
  ]);
});

test('a read-only local image is refused with a way out', () => {
  const plan = planMigration(vm([{ ...localRoot, readOnly: true }]), source, destination(), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, ['disk root: read-only local images are not migrated yet; put read-only media on the storage server']);
});

test('the RAM settings carry the options through', () => {
  const options = { ...defaultMigrationOptions, maxDowntimeMs: 120, bandwidthMiBs: 200, allowPostcopy: true };
  const plan = planMigration(vm([sharedData]), source, destination(), options);
  assert.deepEqual(plan.ram, { memoryMiB: 512, maxDowntimeMs: 120, downtimeLimitsMs: [120], bandwidthMiBs: 200, allowPostcopy: true, compareMemory: true });
});

test('TCG guests up to 2 GiB have their memory compared at switch-over; KVM guests and larger ones do not', () => {
  const compares = (memoryMiB: number, accelerator: 'kvm' | 'tcg'): boolean =>
    planMigration(vm([localRoot], memoryMiB), { ...source, accelerator }, destination(), defaultMigrationOptions).ram.compareMemory;
  assert.equal(compares(512, 'tcg'), true);
  assert.equal(compares(2048, 'tcg'), true);
  assert.equal(compares(4096, 'tcg'), false);
  assert.equal(compares(512, 'kvm'), false);
});

test('a KVM guest climbs a ladder of downtime limits; a TCG guest starts at the maximum to keep pre-copy short', () => {
  const limits = (accelerator: 'kvm' | 'tcg', maxDowntimeMs: number): number[] =>
    planMigration(vm([localRoot]), { ...source, accelerator }, destination(), { ...defaultMigrationOptions, maxDowntimeMs }).ram.downtimeLimitsMs;
  assert.deepEqual(limits('kvm', 300), [75, 150, 300]);
  assert.deepEqual(limits('tcg', 300), [300]);
  assert.deepEqual(limits('kvm', 2), [1, 2], 'steps below 1 ms are dropped, equal steps merged');
});

test('a NIC whose bridge the destination lacks refuses the plan, naming the NIC and the bridge', () => {
  const spec: VmSpec = { ...vm([localRoot]), nics: [{ id: 'net0', bridge: 'vmbr0', mac: '52:54:00:12:34:56' }, { id: 'net1', bridge: 'storage', mac: '52:54:00:12:34:57' }] };
  const refused = planMigration(spec, source, destination({ bridges: ['vmbr0'] }), defaultMigrationOptions);
  assert.deepEqual(refused.refusals, ['NIC net1: B has no bridge storage for its tap']);
  const allowed = planMigration(spec, source, destination({ bridges: ['vmbr0', 'storage'] }), defaultMigrationOptions);
  assert.deepEqual(allowed.refusals, []);
});

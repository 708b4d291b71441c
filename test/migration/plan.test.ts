import assert from 'node:assert/strict';
import { test } from 'node:test';
import { defaultMigrationOptions, exportKey, planMigration, type DestinationFacts, type MigrationOptions, type SourceFacts } from '../../src/migration/plan.ts';
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
    address: '10.0.0.2',
    qemuVersion: '7.2.0',
    machineTypes: ['pc-q35-7.2', 'pc-i440fx-7.2'],
    accelerator: 'tcg',
    cpu: { model: 'qemu64', unavailableFeatures: [] },
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
  assert.equal(plan.toAddress, '10.0.0.2', 'the only address the source agent will send the disks and RAM to');
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
  const options = { ...defaultMigrationOptions, maxDowntimeMs: 120, bandwidthMiBs: 200 };
  const plan = planMigration(vm([sharedData]), source, destination(), options);
  assert.deepEqual(plan.ram, { memoryMiB: 512, maxDowntimeMs: 120, downtimeLimitsMs: [120], bandwidthMiBs: 200, mode: 'live', postcopyAtOnce: true, allowPostcopy: false, compareMemory: true, stopAfterFirstPass: true });
  assert.equal(planMigration(vm([sharedData]), source, destination(), { ...options, ramMode: 'postcopy' }).ram.mode, 'postcopy');
  const kvm = planMigration(vm([sharedData]), { ...source, accelerator: 'kvm' }, destination({ accelerator: 'kvm' }), { ...options, allowPostcopy: true });
  assert.deepEqual(kvm.refusals, []);
  assert.equal(kvm.ram.allowPostcopy, true);
});

test('a late switch to post-copy is refused for a TCG guest, whose pre-copy passes lose writes post-copy never resends; KVM guests may', () => {
  const refusals = (accelerator: 'kvm' | 'tcg', options: Partial<typeof defaultMigrationOptions>): string[] =>
    planMigration(vm([sharedData]), { ...source, accelerator }, destination({ accelerator }), { ...defaultMigrationOptions, ...options }).refusals;
  assert.match(refusals('tcg', { allowPostcopy: true }).join(), /--allow-postcopy switches to post-copy after pre-copy passes, and under TCG QEMU 7\.2 loses guest writes .* Use --ram-mode postcopy \(a TCG guest switches at once\) or --timeout-action pause/);
  assert.match(refusals('tcg', { timeoutAction: 'postcopy' }).join(), /--timeout-action postcopy switches to post-copy after pre-copy passes/);
  assert.deepEqual(refusals('tcg', { ramMode: 'postcopy' }), []);
  assert.deepEqual(refusals('kvm', { allowPostcopy: true, timeoutAction: 'postcopy' }), []);
});

test('TCG guests up to 2 GiB have their memory compared at switch-over; KVM guests and larger ones do not', () => {
  const compares = (memoryMiB: number, accelerator: 'kvm' | 'tcg'): boolean =>
    planMigration(vm([localRoot], memoryMiB), { ...source, accelerator }, destination({ accelerator }), defaultMigrationOptions).ram.compareMemory;
  assert.equal(compares(512, 'tcg'), true);
  assert.equal(compares(2048, 'tcg'), true);
  assert.equal(compares(4096, 'tcg'), false);
  assert.equal(compares(512, 'kvm'), false);
});

test('a KVM guest climbs a ladder of downtime limits; a TCG guest starts at the maximum to keep pre-copy short', () => {
  const limits = (accelerator: 'kvm' | 'tcg', maxDowntimeMs: number): number[] =>
    planMigration(vm([localRoot]), { ...source, accelerator }, destination({ accelerator }), { ...defaultMigrationOptions, maxDowntimeMs }).ram.downtimeLimitsMs;
  assert.deepEqual(limits('kvm', 300), [75, 150, 300]);
  assert.deepEqual(limits('tcg', 300), [300]);
  assert.deepEqual(limits('kvm', 2), [1, 2], 'steps below 1 ms are dropped, equal steps merged');
});

test('a TCG guest in live pre-copy runs through its first pass only; not a KVM guest, nor with --no-tcg-stop-copy; a late post-copy is refused instead', () => {
  const planFor = (accelerator: 'kvm' | 'tcg', options: Partial<MigrationOptions> = {}) =>
    planMigration(vm([localRoot]), { ...source, accelerator }, destination({ accelerator }), { ...defaultMigrationOptions, ...options });
  const stopAt = (accelerator: 'kvm' | 'tcg', options: Partial<MigrationOptions> = {}): boolean | undefined => planFor(accelerator, options).ram.stopAfterFirstPass;
  assert.equal(stopAt('tcg'), true);
  assert.equal(stopAt('kvm'), undefined);
  assert.equal(stopAt('tcg', { tcgStopCopy: false }), undefined);
  assert.equal(stopAt('kvm', { allowPostcopy: true }), undefined);
  assert.equal(planFor('tcg', { allowPostcopy: true }).refusals.length, 1);
  assert.equal(planFor('tcg', { timeoutAction: 'postcopy' }).refusals.length, 1);
  assert.equal(stopAt('tcg', { ramMode: 'postcopy' }), undefined);
  assert.equal(stopAt('tcg', { ramMode: 'stop-and-copy' }), undefined, 'stopped before RAM moves anyway');
});

test('a guest never moves between a KVM host and a TCG host, either way, and the refusal says which runs what', () => {
  const kvmToTcg = planMigration(vm([sharedData]), { ...source, accelerator: 'kvm' }, destination({ accelerator: 'tcg' }), defaultMigrationOptions);
  assert.equal(kvmToTcg.refusals.length, 1, kvmToTcg.refusals.join('; '));
  assert.match(kvmToTcg.refusals[0] as string, /the VM runs under KVM on A but B runs guests under TCG: QEMU does not move a guest between KVM and TCG/);
  const tcgToKvm = planMigration(vm([sharedData]), source, destination({ accelerator: 'kvm' }), defaultMigrationOptions);
  assert.match(tcgToKvm.refusals.join('; '), /runs under TCG on A but B runs guests under KVM/);
  assert.deepEqual(planMigration(vm([sharedData]), { ...source, accelerator: 'kvm' }, destination({ accelerator: 'kvm' }), defaultMigrationOptions).refusals, []);
});

test('a destination whose QEMU lacks features of the CPU model is refused with the features named', () => {
  const cpu = { model: 'Icelake-Server-v1', unavailableFeatures: ['pcid', 'x2apic', 'avx512f'] };
  const plan = planMigration({ ...vm([sharedData]), cpu: cpu.model }, source, destination({ cpu }), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, ['B cannot run CPU model Icelake-Server-v1 under TCG: its QEMU lacks pcid, x2apic, avx512f']);
});

test('a destination whose QEMU does not know the CPU model is refused', () => {
  const plan = planMigration({ ...vm([sharedData]), cpu: 'Futurelake-v9' }, source, destination({ cpu: { model: 'Futurelake-v9', unavailableFeatures: null } }), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, ['B (QEMU 7.2.0) does not know CPU model Futurelake-v9']);
});

test('an overlay on a shared base: the overlay is mirrored (top only), its base re-attached; a destination that cannot reach the base is refused', () => {
  const overlay: DiskSpec = { id: 'root', source: { kind: 'file', path: '/pool/a/root.qcow2', format: 'qcow2', backing: { server: storage, export: 'golden' } } };
  const facts: SourceFacts = { ...source, localDisks: { root: { virtualSize: 2 * gib, allocatedBytes: 30 * 1024 ** 2, backingFile: 'nbd://127.0.0.1:10809/golden' } } };
  const golden = exportKey(storage, 'golden');
  const plan = planMigration(vm([overlay, sharedData]), facts, destination({ reachableExports: { [golden]: 2 * gib, [exportKey(storage, 'data')]: 4 * gib } }), defaultMigrationOptions);
  assert.deepEqual(plan.refusals, []);
  assert.deepEqual(operations(plan), [
    ['root', 'mirror', 30 * 1024 ** 2],
    ['data', 'reattach', 0],
  ]);
  assert.equal(plan.disks[0]?.mirrorSync, 'top');
  assert.deepEqual(plan.disks[0]?.base, { export: golden, virtualSize: 2 * gib, reachable: true });
  assert.match(plan.disks[0]?.reason ?? '', /overlay on A: its own data copied while the guest runs; its base re-attached$/);

  const cut = planMigration(vm([overlay]), facts, destination({ reachableExports: {} }), defaultMigrationOptions);
  assert.deepEqual(cut.refusals, [`disk root: B cannot reach shared volume ${golden}, the base of its overlay`]);
  assert.equal(cut.disks[0]?.base?.reachable, false);
  assert.match(cut.disks[0]?.reason ?? '', /its base is NOT reachable from B$/);
});

test('a NIC whose bridge the destination lacks refuses the plan, naming the NIC and the bridge', () => {
  const spec: VmSpec = { ...vm([localRoot]), nics: [{ id: 'net0', bridge: 'vmbr0', mac: '52:54:00:12:34:56' }, { id: 'net1', bridge: 'storage', mac: '52:54:00:12:34:57' }] };
  const refused = planMigration(spec, source, destination({ bridges: ['vmbr0'] }), defaultMigrationOptions);
  assert.deepEqual(refused.refusals, ['NIC net1: B has no bridge storage for its tap']);
  const allowed = planMigration(spec, source, destination({ bridges: ['vmbr0', 'storage'] }), defaultMigrationOptions);
  assert.deepEqual(allowed.refusals, []);
});

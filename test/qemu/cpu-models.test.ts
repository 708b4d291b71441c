// CPU models against the real QEMU under TCG: which ones it can run, the
// planner's refusal of a destination that lacks a model's features, and a VM
// that starts with exactly its model or not at all.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { testGuestPaths } from '../../src/guest/test-guest.ts';
import { defaultMigrationOptions, planMigration, type SourceFacts } from '../../src/migration/plan.ts';
import { probeDestination, qemuCapabilities, type QemuCapabilities } from '../../src/migration/probe.ts';
import { defaultCpuModel, queryCpuModels } from '../../src/qemu/cpu-models.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';
import { LocalPool } from '../../src/storage/local-pool.ts';
import { makeTempDir } from '../support/temp.ts';

let temp: { path: string; remove(): Promise<void> };
let qemu: QemuCapabilities;

before(async () => {
  temp = await makeTempDir('cpu-models');
  qemu = await qemuCapabilities('tcg');
});

after(() => temp.remove());

function spec(name: string, cpu: string): VmSpec {
  return { name, vcpus: 1, memoryMiB: 64, cpu, boot: { kind: 'kernel', ...testGuestPaths(), append: 'console=ttyS0' }, disks: [] };
}

test('under TCG the default model and the documented x86-64-v2 models run; a recent Intel server model lacks features', async () => {
  const models = await queryCpuModels('tcg');
  for (const model of [defaultCpuModel, 'Nehalem-v1', 'Westmere-v1']) assert.deepEqual(models[model], [], `${model} lacks ${models[model]?.join(', ')}`);
  const missing = models['Icelake-Server-v1'] ?? [];
  for (const feature of ['avx512f', 'pcid', 'x2apic']) assert.ok(missing.includes(feature), `Icelake-Server-v1 lacks only ${missing.join(', ')}`);
  assert.equal(models['Futurelake-v9'], undefined);
});

test('a destination whose QEMU cannot run the VM\'s CPU model is refused with the missing features named', async () => {
  const source: SourceFacts = { hostId: 'A', qemuVersion: qemu.version, machineType: qemu.machines.q35 ?? 'q35', accelerator: 'tcg', localDisks: {} };
  const pool = new LocalPool(temp.path);
  const icelake = spec('icelake', 'Icelake-Server-v1');
  const refused = planMigration(icelake, source, await probeDestination('B', '127.0.0.1', icelake, pool, [], qemu), defaultMigrationOptions);
  assert.equal(refused.refusals.length, 1, refused.refusals.join('; '));
  assert.match(refused.refusals[0] as string, /^B cannot run CPU model Icelake-Server-v1 under TCG: its QEMU lacks .*\bavx512f\b/);
  const westmere = spec('westmere', 'Westmere-v1');
  assert.deepEqual(planMigration(westmere, source, await probeDestination('B', '127.0.0.1', westmere, pool, [], qemu), defaultMigrationOptions).refusals, []);
});

test('a VM runs its CPU model: the guest\'s CPU is that model, and QEMU was told to enforce it', async () => {
  const vm = await QemuProcess.start(spec('westmere', 'Westmere-v1'), { mode: 'paused', runDir: join(temp.path, 'run-westmere') });
  try {
    const cmdline = (await readFile(`/proc/${vm.pid}/cmdline`, 'utf8')).split('\0');
    assert.deepEqual(cmdline.slice(cmdline.indexOf('-cpu'), cmdline.indexOf('-cpu') + 2), ['-cpu', 'Westmere-v1,enforce']);
    const [cpu] = await vm.monitor.client.execute<{ 'qom-path': string }[]>('query-cpus-fast');
    const modelId = await vm.monitor.client.execute<string>('qom-get', { path: cpu?.['qom-path'] ?? '', property: 'model-id' });
    assert.match(modelId, /Westmere/);
  } finally {
    await vm.kill();
    await vm.cleanup();
  }
});

test('a VM whose CPU model the host cannot run does not start, and QEMU\'s error names the missing features', async () => {
  await assert.rejects(QemuProcess.start(spec('icelake', 'Icelake-Server-v1'), { mode: 'paused', runDir: join(temp.path, 'run-icelake') }), (err: unknown) => {
    assert.ok(hasCode(err, 'VMF_QEMU_START'), String(err));
    assert.match(err.message, /TCG doesn't support requested feature: .*avx512f/s);
    return true;
  });
});

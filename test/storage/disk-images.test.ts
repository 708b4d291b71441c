// A user's disk images into a host's pool (real qemu-img, a real storage
// server): an import copies the image and never touches the file; an overlay
// reads through a shared base; bad input is a clear error and leaves nothing
// in the pool or the agent's data directory.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { RequestGuard } from '../../src/agent/request-guard.ts';
import { VmRegistry } from '../../src/agent/vm-registry.ts';
import type { CreateVmRequest } from '../../src/api/agent-types.ts';
import { hasCode } from '../../src/errors.ts';
import { testGuestDir, testGuestDiskImage } from '../../src/guest/test-guest.ts';
import { createOverlay, importImage, nbdUri } from '../../src/storage/disk-images.ts';
import { imageInfo, LocalPool } from '../../src/storage/local-pool.ts';
import { runProgram } from '../../src/util/run.ts';
import { Cleanup } from '../support/cleanup.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
const bootImage = testGuestDiskImage();
const cleanup = new Cleanup();
let dir: string;
let storage: TestStorage;
let registry: VmRegistry;

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

before(async () => {
  const temp = await makeTempDir('images');
  cleanup.add('remove temp dir', () => temp.remove());
  dir = temp.path;
  storage = await startTestStorage();
  cleanup.add('stop the storage server', () => storage.stop());
  const agentDir = join(dir, 'agent');
  const guard = await RequestGuard.create({ trustedDirs: [dir, testGuestDir()], poolDir: join(agentDir, 'pool'), vmsDir: join(agentDir, 'vms'), storageNbd: server() });
  registry = new VmRegistry('A', agentDir, pino({ level: 'silent' }), { accelerator: 'tcg', reason: 'test' }, guard);
  await registry.init();
});

after(() => cleanup.run());

function poolFiles(): string[] {
  return readdirSync(registry.pool.dir);
}

function vmDirs(): string[] {
  return readdirSync(join(dir, 'agent', 'vms'));
}

const server = (): { type: 'inet'; host: string; port: number } => ({ type: 'inet', host: '127.0.0.1', port: storage.nbdPort });

test('an imported qcow2 becomes a pool image with the same content; the file is not modified', async () => {
  const before = sha256(bootImage);
  const pool = new LocalPool(join(dir, 'pool-import'));
  mkdirSync(pool.dir);
  const path = await importImage(pool, 'web-root.qcow2', bootImage, 'qcow2');
  assert.equal(sha256(bootImage), before, 'the imported file is byte for byte what it was');
  qemuImg('compare', '-q', '-f', 'qcow2', '-F', 'qcow2', bootImage, path);
  assert.equal((await imageInfo(path, 'qcow2')).backingFile, undefined, 'a standalone image: nothing outside the pool behind it');
});

test('a raw image is imported too, detected by qemu-img', async () => {
  const raw = join(dir, 'disk.raw');
  qemuImg('convert', '-q', '-f', 'qcow2', '-O', 'raw', bootImage, raw);
  const info = await registry.create({ name: 'rawimport', boot: { kind: 'disk', diskId: 'root' }, disks: [{ id: 'root', local: { import: raw } }] });
  const source = info.spec.disks[0]?.source;
  assert.ok(source?.kind === 'file' && source.format === 'qcow2');
  qemuImg('compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, source.path);
  await registry.remove('rawimport');
});

const badImports: { what: string; file: () => string; message: RegExp }[] = [
  { what: 'a missing file', file: () => join(dir, 'nope.qcow2'), message: /cannot import \/.*nope\.qcow2: no such file/ },
  {
    what: 'a text file',
    file: () => {
      writeFileSync(join(dir, 'notes.txt'), 'not a disk image\n');
      return join(dir, 'notes.txt');
    },
    message: /notes\.txt: not a disk image \(no qcow2 header, and 17 bytes is not a whole number of 512-byte sectors\)/,
  },
  { what: 'a directory', file: () => dir, message: /not a regular file or block device/ },
  {
    what: 'a vmdk image',
    file: () => {
      qemuImg('create', '-q', '-f', 'vmdk', join(dir, 'disk.vmdk'), '16M');
      return join(dir, 'disk.vmdk');
    },
    message: /disk\.vmdk: it is a vmdk image; only qcow2 and raw are imported/,
  },
];

for (const { what, file, message } of badImports) {
  test(`importing ${what} is refused by name, and nothing of the VM is left`, async () => {
    const request: CreateVmRequest = {
      name: 'bad',
      boot: { kind: 'disk', diskId: 'root' },
      // The first disk is created before the second fails: it goes too.
      disks: [
        { id: 'scratch', local: { sizeBytes: 16 * MiB } },
        { id: 'root', local: { import: file() } },
      ],
    };
    await assert.rejects(registry.create(request), (err: unknown) => hasCode(err, 'VMF_IMAGE_INVALID') && message.test((err as Error).message));
    assert.deepEqual(poolFiles(), []);
    assert.deepEqual(vmDirs(), []);
  });
}

test('an overlay on a base that does not exist is refused, and nothing of the VM is left', async () => {
  await assert.rejects(
    registry.create({ name: 'nobase', boot: { kind: 'disk', diskId: 'root' }, disks: [{ id: 'root', local: { base: 'golden-nope', baseServer: server() } }] }),
    (err: unknown) => hasCode(err, 'VMF_IMAGE_INVALID') && /base volume golden-nope cannot be opened at nbd:\/\/127\.0\.0\.1:\d+\/golden-nope/.test((err as Error).message),
  );
  assert.deepEqual(poolFiles(), []);
  assert.deepEqual(vmDirs(), []);
});

test('requests that mix what cannot go together name the field', async () => {
  const cases: { local: NonNullable<CreateVmRequest['disks'][number]['local']>; message: RegExp }[] = [
    { local: {}, message: /disks\.root\.local needs "sizeBytes" \(an empty disk\), "import" \(an image file\) or "base"/ },
    { local: { import: bootImage, base: 'golden' }, message: /takes "import" or "base", not both/ },
    { local: { import: bootImage, sizeBytes: 64 * MiB }, message: /takes no "sizeBytes" with "import"/ },
    { local: { base: 'golden' }, message: /needs "baseServer" with "base"/ },
  ];
  for (const { local, message } of cases) {
    await assert.rejects(
      registry.create({ name: 'mixed', boot: { kind: 'disk', diskId: 'root' }, disks: [{ id: 'root', local }] }),
      (err: unknown) => hasCode(err, 'VMF_INVALID_SPEC') && message.test((err as Error).message),
    );
  }
  assert.deepEqual(poolFiles(), []);
});

test('an overlay reads through its shared base and writes only to itself; the base is untouched', async () => {
  await storage.server.volumes.create('golden', 128 * MiB);
  // Not execFileSync: the storage server runs in this process and must answer.
  await runProgram('qemu-img', ['convert', '-q', '-n', '-f', 'qcow2', '-O', 'raw', bootImage, storage.uri('golden')]);
  const baseFile = join(storage.dataDir, 'volumes', 'golden.raw');
  const baseHash = sha256(baseFile);
  await assert.rejects(
    registry.create({ name: 'small', boot: { kind: 'disk', diskId: 'root' }, disks: [{ id: 'root', local: { base: 'golden', baseServer: server(), sizeBytes: 64 * MiB } }] }),
    (err: unknown) => hasCode(err, 'VMF_IMAGE_INVALID') && /overlay of 67108864 bytes cannot hold base volume golden of 134217728 bytes/.test((err as Error).message),
  );
  const info = await registry.create({ name: 'ovl', boot: { kind: 'disk', diskId: 'root' }, disks: [{ id: 'root', local: { base: 'golden', baseServer: server() } }] });
  const source = info.spec.disks[0]?.source;
  assert.ok(source?.kind === 'file');
  assert.deepEqual(source.backing, { server: server(), export: 'golden' });
  const overlay = source.path;
  assert.equal((await imageInfo(overlay, 'qcow2', { ownDataOnly: true })).virtualSize, 128 * MiB, 'the base\'s size by default');
  assert.equal((await imageInfo(overlay, 'qcow2', { ownDataOnly: true })).allocatedBytes, 0, 'a fresh overlay holds nothing of its own');
  // What the guest would see: the base's bytes, then its own writes on top.
  await runProgram('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', overlay, bootImage]);
  await runProgram('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 40M 1M', overlay]);
  assert.equal((await imageInfo(overlay, 'qcow2', { ownDataOnly: true })).allocatedBytes, 1 * MiB);
  assert.equal(sha256(baseFile), baseHash, 'the base volume is unchanged');
  await registry.remove('ovl');
  assert.deepEqual(poolFiles(), []);
});

test('a destination creates its overlay on the base without connecting to it (the planner did)', async () => {
  const pool = new LocalPool(join(dir, 'pool-overlay'));
  mkdirSync(pool.dir);
  // An address nothing listens on: a connection attempt would fail.
  const path = await createOverlay(pool, 'x-root.qcow2', { server: { type: 'unix', path: join(dir, 'nobody.sock') }, export: 'golden' }, { sizeBytes: 32 * MiB, probe: false });
  const info = await imageInfo(path, 'qcow2', { ownDataOnly: true });
  assert.equal(info.virtualSize, 32 * MiB);
  assert.equal(info.backingFile, nbdUri({ type: 'unix', path: join(dir, 'nobody.sock') }, 'golden'));
});

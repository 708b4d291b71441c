// Sparse volumes: TRIM and WRITE_ZEROES punch holes (NO_HOLE keeps the range
// allocated), BLOCK_STATUS reports data and holes from SEEK_DATA/SEEK_HOLE,
// and a mostly empty image copied in stays mostly empty.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.ts';
import { FileBackend } from '../../src/storage/volume-backends.ts';
import { makeTempDir } from '../support/temp.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';

const execFile = promisify(execFileCallback);
const MiB = 1024 * 1024;
let storage: TestStorage;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  storage = await startTestStorage();
  work = await makeTempDir('holes');
});
after(async () => {
  await storage.stop();
  await work.remove();
});

const volumeFile = (name: string): string => join(storage.dataDir, 'volumes', `${name}.raw`);
const allocated = async (name: string): Promise<number> => (await stat(volumeFile(name))).blocks * 512;
const connect = (name: string): Promise<NbdClient> => NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, { exportName: name });

test('block status follows what was written, punched and zeroed', async () => {
  await storage.server.volumes.create('map', 16 * MiB);
  const client = await connect('map');
  await client.write(MiB, Buffer.alloc(4 * MiB, 0xee));
  await client.flush();
  assert.deepEqual(await client.blockStatus(0, 16 * MiB), [
    { offset: 0, length: MiB, flags: 3 },
    { offset: MiB, length: 4 * MiB, flags: 0 },
    { offset: 5 * MiB, length: 11 * MiB, flags: 3 },
  ]);
  assert.equal(await allocated('map'), 4 * MiB);

  // WRITE_ZEROES without NO_HOLE punches: reads zeros, and the blocks are gone.
  await client.writeZeroes(MiB, MiB, { fua: true });
  assert.ok((await client.read(MiB, MiB)).every((b) => b === 0));
  assert.equal(await allocated('map'), 3 * MiB);
  // TRIM punches too.
  await client.trim(2 * MiB, MiB);
  assert.equal(await allocated('map'), 2 * MiB);
  // NO_HOLE zeroes in place.
  await client.writeZeroes(3 * MiB, MiB, { noHole: true });
  assert.ok((await client.read(3 * MiB, MiB)).every((b) => b === 0));
  assert.equal((await client.read(4 * MiB, 1))[0], 0xee);
  assert.deepEqual(await client.blockStatus(4 * MiB, MiB, { reqOne: true }), [{ offset: 4 * MiB, length: MiB, flags: 0 }]);
  await client.close();

  // nbdinfo sees the same map: 0-3 MiB holes, 4-5 MiB data (3-4 MiB, zeroed in place, may be either).
  const { stdout } = await execFile('nbdinfo', ['--map', storage.uri('map')]);
  const map = stdout.trim().split('\n').map((line) => line.trim().split(/\s+/).map(Number) as [number, number, number]);
  const at = (offset: number): number | undefined => map.find(([start, length]) => start <= offset && offset < start + length)?.[2];
  assert.equal(at(0), 3);
  assert.equal(at(2 * MiB + 1), 3);
  assert.equal(at(4 * MiB + 1), 0);
  assert.equal(at(6 * MiB), 3);
});

test('qemu-img convert of a mostly empty image keeps the volume sparse; compare agrees', async () => {
  const source = join(work.path, 'sparse.qcow2');
  await execFile('qemu-img', ['create', '-q', '-f', 'qcow2', source, '1G']);
  await execFile('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 100M 2M', source]);
  await storage.server.volumes.create('sparse', 1024 * MiB);
  // Fill the volume first, so zeroing the rest is real work that must become holes.
  const client = await connect('sparse');
  await client.write(500 * MiB, Buffer.alloc(8 * MiB, 0xff));
  await client.close();
  await execFile('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', source, storage.uri('sparse')]);
  await execFile('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', source, storage.uri('sparse')]);
  assert.ok((await allocated('sparse')) <= 4 * MiB, `allocated ${await allocated('sparse')} bytes`);
});

test('without the helper, zeroes are written and block status says data: slower, still correct', async () => {
  const path = join(work.path, 'plain.raw');
  const file = await open(path, 'w+');
  try {
    await file.truncate(MiB);
    await file.write(Buffer.alloc(MiB, 0x77), 0, MiB, 0);
    const backend = new FileBackend(file, MiB, undefined);
    await backend.writeZeroes(4096, 8192, true, false);
    await backend.trim(0, 4096, false);
    const data = Buffer.alloc(16384);
    await backend.read(0, data);
    assert.equal(data[0], 0x77, 'TRIM without holes keeps the data');
    assert.ok(data.subarray(4096, 12288).every((b) => b === 0));
    assert.equal(data[12288], 0x77);
    assert.deepEqual(await backend.blockStatus(0, MiB), [{ length: MiB, flags: 0 }]);
  } finally {
    await file.close();
  }
});

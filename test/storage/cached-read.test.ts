// Reads served from the page cache on the storage server's event loop (src/storage/cached-read.ts): the bytes
// are the file's, and nothing is read there that would make the event loop wait for the disk.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, test } from 'node:test';
import { pino } from 'pino';
import { loadCachedRead, type CachedRead } from '../../src/storage/cached-read.ts';
import { FileBackend } from '../../src/storage/volume-backends.ts';
import { makeTempDir } from '../support/temp.ts';

const execFile = promisify(execFileCallback);
const MiB = 1024 * 1024;
const work = await makeTempDir('cached-read');
after(() => work.remove());

/** GNU dd's nocache with count=0 asks the kernel to drop the whole file from the page cache (written back first). */
async function dropFromCache(path: string): Promise<void> {
  await execFile('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
}

test('a cached read is copied on the spot, an uncached one waits for the thread pool; both give the file\'s bytes', async () => {
  // tmpfs keeps everything in memory: nothing there is ever uncached.
  assert.notEqual((await statfs(work.path)).type, 0x01021994, `${work.path} is on tmpfs, where no read waits for a disk`);
  const loaded = await loadCachedRead(pino({ level: 'silent' }));
  assert.ok(loaded, 'the cached-read addon builds (cc and Node headers, from scripts/setup.sh)');
  let copiedOnTheSpot = 0;
  const cachedRead: CachedRead = (...args) => {
    const copied = loaded(...args);
    copiedOnTheSpot += copied;
    return copied;
  };
  const path = join(work.path, 'volume.raw');
  const data = randomBytes(4 * MiB);
  const file = await open(path, 'w+');
  try {
    await file.write(data, 0, data.length, 0);
    await file.datasync();
    // The volume is 1 MiB larger than the file has written: that part reads as zeros.
    const backend = new FileBackend(file, 5 * MiB, undefined, cachedRead);
    // Into a buffer holding old bytes, as the server's reused buffers do: every byte must be overwritten.
    const read = async (offset: number, length: number): Promise<Buffer> => {
      const target = Buffer.alloc(length, 0xee);
      await backend.read(offset, target);
      return target;
    };

    // RWF_NOWAIT still starts the kernel's readahead of a page it cannot copy; a fast disk (a VM's, cached by its
    // host) can finish that before the kernel checks the page, and then the bytes are copied. A plain pread
    // would copy every time, so one refusal in a few tries tells the two apart.
    let refused = 0;
    for (let attempt = 0; attempt < 10 && refused === 0; attempt++) {
      await dropFromCache(path);
      const probe = Buffer.alloc(4096);
      const copied: number = loaded(file.fd, probe, 0, 4096, 2 * MiB);
      if (copied === 0) refused++;
      else assert.deepEqual(probe.subarray(0, copied), data.subarray(2 * MiB, 2 * MiB + copied), 'a page the readahead brought in time is the file\'s');
    }
    assert.equal(refused, 1, 'nothing is copied from a page the kernel would have to read from disk (10 tries)');
    await dropFromCache(path);
    assert.deepEqual(await read(2 * MiB, 64 * 1024), data.subarray(2 * MiB, 2 * MiB + 64 * 1024), 'an uncached read gives the file\'s bytes');

    copiedOnTheSpot = 0;
    assert.deepEqual(await read(2 * MiB, 4096), data.subarray(2 * MiB, 2 * MiB + 4096));
    assert.equal(copiedOnTheSpot, 4096, 'a page just read is copied on the spot');

    // Part cached (what was just read), part not: one answer, in order.
    await dropFromCache(path);
    await read(MiB, 64 * 1024);
    assert.deepEqual(await read(MiB, 3 * MiB), data.subarray(MiB, 4 * MiB), 'a read that is only partly cached gives the file\'s bytes');

    const acrossTheEnd = await read(4 * MiB - 4096, 8192);
    assert.deepEqual(acrossTheEnd.subarray(0, 4096), data.subarray(4 * MiB - 4096), 'the last written page');
    assert.ok(acrossTheEnd.subarray(4096).every((byte) => byte === 0), 'past the written end: zeros, not what the buffer held');
  } finally {
    await file.close();
  }
});

test('the addon refuses a range outside the buffer instead of writing past it', async () => {
  const loaded = await loadCachedRead(pino({ level: 'silent' }));
  assert.ok(loaded);
  const file = await open(join(work.path, 'small.raw'), 'w+');
  try {
    await file.write(Buffer.alloc(8192, 1), 0, 8192, 0);
    assert.throws(() => loaded(file.fd, Buffer.alloc(4096), 2048, 4096, 0), /outside the buffer/);
    assert.throws(() => loaded(file.fd, Buffer.alloc(4096), -1, 10, 0), /outside the buffer or negative/);
  } finally {
    await file.close();
  }
});

// The memory digest that guards a TCG guest's switch-over, on a real QEMU: it
// must equal a digest of QEMU's own dump of the guest's RAM, and it must skip
// the RAM that only the kernel's zero page backs, which is most of a guest's
// RAM once pre-copy has read it.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import xxhash from 'xxhash-wasm';
import { testGuestPaths } from '../../src/guest/test-guest.ts';
import { differingChunks, locateGuestRam, memoryDigest, memoryDigestChunkBytes, zeroChunks } from '../../src/qemu/memory-digest.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import { hashRamChunks } from '../../src/qemu/ram-hasher.ts';
import { makeTempDir } from '../support/temp.ts';

let temp: { path: string; remove(): Promise<void> };
before(async () => (temp = await makeTempDir('memory-digest')));
after(() => temp.remove());

const memoryMiB = 256;

test("after pre-copy read a guest's RAM, the chunks the zero page backs are skipped and the digest still equals QEMU's dump", async () => {
  const vm = await QemuProcess.start(
    { name: 'digest', vcpus: 1, memoryMiB, boot: { kind: 'kernel', ...testGuestPaths(), append: 'console=ttyS0' }, disks: [] },
    { runDir: join(temp.path, 'run') },
  );
  try {
    // Let the kernel write its pages, then read every page of RAM the way pre-copy does.
    await sleep(1500);
    // Its status is asked at the same time as its page tables are read: a running guest is still refused.
    await assert.rejects(memoryDigest(vm, AbortSignal.timeout(30_000)), (err: Error & { code?: string }) => err.code === 'VMF_CONFLICT');
    await vm.monitor.client.execute('migrate', { uri: 'exec:cat > /dev/null' });
    for (let i = 0; i < 300; i++) {
      const { status } = await vm.monitor.client.execute<{ status: string }>('query-migrate');
      if (status === 'completed') break;
      assert.notEqual(status, 'failed');
      await sleep(100);
    }
    const address = Number(/is (0x[0-9a-f]+)/.exec(await vm.monitor.client.execute<string>('human-monitor-command', { 'command-line': 'gpa2hva 0' }))?.[1]);
    const size = memoryMiB * 1024 * 1024;
    const zero = await zeroChunks(vm.pid, address, size);
    // The guest's kernel writes some tens of MiB; the rest pre-copy read and left on the zero page.
    assert.ok(zero.size >= memoryMiB / 4, `only ${zero.size} of ${memoryMiB} MiB known to be zero: the guest's RAM would be read nearly whole while it is paused`);
    assert.ok(zero.size < memoryMiB, 'the guest wrote some of its RAM');

    // Where its RAM is was found before the pause (as the migration sides do): inside it, QEMU is only asked its status.
    await locateGuestRam(vm);
    const client = vm.monitor.client;
    const execute = client.execute.bind(client);
    const asked: string[] = [];
    client.execute = <T>(...args: Parameters<typeof execute>): Promise<T> => {
      asked.push(args[0]);
      return execute<T>(...args);
    };
    const digest = await memoryDigest(vm, AbortSignal.timeout(30_000));
    client.execute = execute;
    assert.deepEqual(asked, ['query-status']);
    const dump = join(temp.path, 'ram.dump');
    await vm.monitor.client.execute('pmemsave', { val: 0, size, filename: dump });
    const ram = await readFile(dump);
    const hasher = await xxhash();
    const expected = Array.from({ length: memoryMiB }, (_, i) => hasher.h64Raw(ram.subarray(i * memoryDigestChunkBytes, (i + 1) * memoryDigestChunkBytes)).toString(16).padStart(16, '0'));
    assert.deepEqual(digest.chunks, expected);
    for (const chunk of zero) assert.ok(ram.subarray(chunk * memoryDigestChunkBytes, (chunk + 1) * memoryDigestChunkBytes).every((b) => b === 0), `chunk ${chunk} is not zero`);
  } finally {
    await vm.kill();
  }
});

test('a chunk is hashed by its content alone: zeros written over the zero page hash as the zero page did, and one changed byte shows in its chunk only', async () => {
  const vm = await QemuProcess.start(
    { name: 'digest-bytes', vcpus: 1, memoryMiB, boot: { kind: 'kernel', ...testGuestPaths(), append: 'console=ttyS0' }, disks: [] },
    { runDir: join(temp.path, 'run-bytes') },
  );
  try {
    await sleep(1500);
    await vm.monitor.client.execute('migrate', { uri: 'exec:cat > /dev/null' });
    for (let i = 0; i < 300 && (await vm.monitor.client.execute<{ status: string }>('query-migrate')).status !== 'completed'; i++) await sleep(100);
    const ram = await locateGuestRam(vm);
    assert.equal(ram.kind, 'process');
    if (ram.kind !== 'process') return;
    const size = memoryMiB * 1024 * 1024;
    const zero = [...(await zeroChunks(vm.pid, ram.address, size))];
    const chunk = zero[Math.floor(zero.length / 2)] as number;
    const before = await memoryDigest(vm, AbortSignal.timeout(30_000));

    // What one end of a migration may hold where the other maps the zero page: a page written with zeros.
    // Written through QEMU's address space, as QEMU's incoming side writes a page it received.
    const memory = await open(ram.path, 'r+');
    try {
      const page = ram.address + chunk * memoryDigestChunkBytes + 5 * 4096;
      await memory.write(Buffer.alloc(4096), 0, 4096, page);
      assert.ok(!(await zeroChunks(vm.pid, ram.address, size)).has(chunk), 'the page written with zeros is read, not skipped');
      assert.deepEqual((await memoryDigest(vm, AbortSignal.timeout(30_000))).chunks, before.chunks);

      // One byte in that partly written chunk, and one in a chunk the guest wrote itself.
      const written = before.chunks.findIndex((_, i) => !zero.includes(i));
      await memory.write(Buffer.from([1]), 0, 1, page + 4095);
      const original = Buffer.alloc(1);
      await memory.read(original, 0, 1, ram.address + written * memoryDigestChunkBytes + 777);
      await memory.write(Buffer.from([original[0]! ^ 0x40]), 0, 1, ram.address + written * memoryDigestChunkBytes + 777);
      const after = await memoryDigest(vm, AbortSignal.timeout(30_000));
      assert.deepEqual(differingChunks(before, after), [written, chunk].sort((a, b) => a - b));
    } finally {
      await memory.close();
    }
  } finally {
    await vm.kill();
  }
});

test('the native hasher gives XXH64 as xxhash-wasm does, for chunks in any order, and names the chunk it could not read', async () => {
  const chunkBytes = 64 * 1024;
  const bytes = randomBytes(4 * chunkBytes);
  const path = join(temp.path, 'chunks.bin');
  await writeFile(path, bytes);
  const hasher = await xxhash();
  const file = await open(path, 'r');
  try {
    const order = [3, 0, 2];
    const expected = order.map((i) => hasher.h64Raw(bytes.subarray(i * chunkBytes, (i + 1) * chunkBytes)).toString(16).padStart(16, '0'));
    assert.deepEqual(await hashRamChunks({ fd: file.fd, address: 0 }, chunkBytes, order), expected);
  } finally {
    await file.close();
  }
  // A process with nothing mapped at the address: the error says which read of which chunk failed, and why.
  const child = spawn('sleep', ['30']);
  try {
    await assert.rejects(hashRamChunks({ pid: child.pid!, address: 0x10000 }, chunkBytes, [2]), /process_vm_readv of chunk 2 at 0x30000: Bad address/);
  } finally {
    child.kill();
  }
});

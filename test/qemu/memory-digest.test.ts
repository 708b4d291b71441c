// The memory digest that guards a TCG guest's switch-over, on a real QEMU: it
// must equal a digest of QEMU's own dump of the guest's RAM, and it must skip
// the RAM that only the kernel's zero page backs, which is most of a guest's
// RAM once pre-copy has read it.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import xxhash from 'xxhash-wasm';
import { testGuestPaths } from '../../src/guest/test-guest.ts';
import { locateGuestRam, memoryDigest, memoryDigestChunkBytes, zeroChunks } from '../../src/qemu/memory-digest.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
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

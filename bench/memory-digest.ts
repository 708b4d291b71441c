/**
 * Where a memory digest's time goes (src/qemu/memory-digest.ts), step by step, on one stopped test guest
 * after a pre-copy has read all of its RAM (as at a switch-over): QEMU's status, finding the RAM (memfd scan,
 * gpa2hva), the page-table scan (pagemap + kpageflags), reading and hashing the chunks (the former JavaScript path
 * against the native hasher on one and on two threads), then the whole digest.
 *
 *   node --import tsx bench/memory-digest.ts [--memory-mib 512] [--dirty-mib 128] [--repeat 5]
 *
 * One QEMU, nothing else in the pause: the figures are the floor of what a switch-over pays, where both
 * ends digest at once on the same machine and QEMU is busy with the end of the migration.
 */
import { open } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import xxhash from 'xxhash-wasm';
import { testGuestSpec } from '../src/guest/test-guest.ts';
import { locateGuestRam, memoryDigest, memoryDigestChunkBytes, zeroChunks } from '../src/qemu/memory-digest.ts';
import { hashRamChunks, loadRamHasher } from '../src/qemu/ram-hasher.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import { makeTempDir } from '../test/support/temp.ts';
import { isMain, machineLine, median } from './lib/common.ts';

async function timed<T>(samples: number[], work: () => Promise<T>): Promise<T> {
  const started = performance.now();
  const result = await work();
  samples.push(performance.now() - started);
  return result;
}

/** The digest's former path: `chunks` of `path` read through libuv's threads, 4 in flight, hashed with WebAssembly. */
async function readAndHashInJs(path: string, base: number, chunks: number[]): Promise<void> {
  const hashes = await xxhash();
  const file = await open(path, 'r');
  try {
    let next = 0;
    const reader = async (): Promise<void> => {
      const buffer = Buffer.allocUnsafe(memoryDigestChunkBytes);
      for (let i = next++; i < chunks.length; i = next++) {
        await file.read(buffer, 0, memoryDigestChunkBytes, base + chunks[i]! * memoryDigestChunkBytes);
        hashes.h64Raw(buffer).toString(16).padStart(16, '0');
      }
    };
    await Promise.all(Array.from({ length: 4 }, reader));
  } finally {
    await file.close();
  }
}

export async function memoryDigestBench(memoryMiB: number, dirtyMiB: number, repeat: number): Promise<void> {
  console.log(`\n== Memory digest, step by step: a ${memoryMiB} MiB test guest dirtying ${dirtyMiB} MiB, stopped after a pre-copy read all of its RAM; medians of ${repeat}`);
  console.log(await machineLine());
  const temp = await makeTempDir('digest-bench');
  const vm = await QemuProcess.start(testGuestSpec('digest', [], temp.path, { mode: 'workload', dirtyMiB, dirtyRateMiBs: dirtyMiB }, memoryMiB), {
    runDir: join(temp.path, 'run'),
  });
  try {
    await sleep(6000);
    // A pre-copy to nowhere: it reads every page (mapping the zero page where none was written) and leaves the guest stopped.
    await vm.monitor.client.execute('migrate', { uri: 'exec:cat > /dev/null' });
    for (let status = ''; status !== 'completed'; await sleep(100)) {
      ({ status } = await vm.monitor.client.execute<{ status: string }>('query-migrate'));
      if (status === 'failed') throw new Error('the pre-copy to /dev/null failed');
    }
    const size = memoryMiB * 1024 * 1024;
    const steps = { status: [] as number[], locate: [] as number[], pageTables: [] as number[], digest: [] as number[] };
    const located = await timed(steps.locate, () => locateGuestRam(vm));
    if (located.kind !== 'process') throw new Error(`this QEMU's RAM is read from a ${located.kind}, not its address space`);
    const native = await loadRamHasher();
    let read: number[] = [];
    const variants: [string, () => Promise<unknown>][] = [
      ['/proc/PID/mem, 4 reads of 1 MiB in flight, XXH64 in WebAssembly on the main thread (the former path)', () => readAndHashInJs(located.path, located.address, read)],
      ['process_vm_readv + XXH64 in the addon, 1 thread', () => native.hashChunks(vm.pid, -1, located.address, memoryDigestChunkBytes, Uint32Array.from(read), new BigUint64Array(read.length))],
      [`process_vm_readv + XXH64 in the addon, as the digest runs it (${Math.min(2, availableParallelism())} threads)`, () => hashRamChunks({ pid: vm.pid, address: located.address }, memoryDigestChunkBytes, read)],
    ];
    const readings = new Map<string, number[]>(variants.map(([name]) => [name, []]));
    for (let round = 0; round < repeat; round++) {
      await timed(steps.status, () => vm.status());
      const zero = await timed(steps.pageTables, () => zeroChunks(vm.pid, located.address, size));
      read = Array.from({ length: memoryMiB }, (_, i) => i).filter((i) => !zero.has(i));
      for (const [name, run] of variants) await timed(readings.get(name)!, run);
      await timed(steps.digest, () => memoryDigest(vm, AbortSignal.timeout(60_000)));
    }
    const ms = (samples: number[]): string => `${median(samples).toFixed(1)} ms`;
    console.log(`chunks read: ${read.length} of ${memoryMiB} (the rest the zero page backs)`);
    console.log(`query-status ${ms(steps.status)}; finding the RAM (memfd scan, gpa2hva; once per QEMU) ${ms(steps.locate)}; ` +
      `page tables (pagemap + kpageflags) ${ms(steps.pageTables)}`);
    for (const [name, samples] of readings) console.log(`reading and hashing ${read.length} MiB, ${name}: ${ms(samples)}`);
    console.log(`the whole digest (RAM already found): ${ms(steps.digest)}`);
  } finally {
    await vm.kill();
    await temp.remove();
  }
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({ options: { 'memory-mib': { type: 'string' }, 'dirty-mib': { type: 'string' }, repeat: { type: 'string' } } });
  await memoryDigestBench(Number(values['memory-mib'] ?? 512), Number(values['dirty-mib'] ?? 128), Number(values.repeat ?? 5));
}

/**
 * Where a memory digest's time goes (src/qemu/memory-digest.ts), step by step, on one stopped test guest
 * after a pre-copy has read all of its RAM (as at a switch-over): QEMU's status, finding the RAM (memfd scan,
 * gpa2hva), the page-table scan (pagemap + kpageflags), the chunk reads and the hashing, then the whole digest.
 * The reads are also timed with other numbers of reads in flight and other read sizes, to choose those.
 *
 *   node --import tsx bench/memory-digest.ts [--memory-mib 512] [--dirty-mib 128] [--repeat 5]
 *
 * One QEMU, nothing else in the pause: the figures are the floor of what a switch-over pays, where both
 * ends digest at once on the same machine and QEMU is busy with the end of the migration.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import xxhash from 'xxhash-wasm';
import { testGuestSpec } from '../src/guest/test-guest.ts';
import { locateGuestRam, memoryDigest, memoryDigestChunkBytes, zeroChunks } from '../src/qemu/memory-digest.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import { makeTempDir } from '../test/support/temp.ts';
import { isMain, machineLine, median } from './lib/common.ts';

async function timed<T>(samples: number[], work: () => Promise<T>): Promise<T> {
  const started = performance.now();
  const result = await work();
  samples.push(performance.now() - started);
  return result;
}

/** Reads `chunks` of `path` from `base` on, `inFlight` reads of `readBytes` at once; hashes nothing. */
async function readChunks(path: string, base: number, chunks: number[], inFlight: number, readBytes: number): Promise<void> {
  const file = await open(path, 'r');
  try {
    const perRead = readBytes / memoryDigestChunkBytes;
    let next = 0;
    const reader = async (): Promise<void> => {
      const buffer = Buffer.allocUnsafe(readBytes);
      for (let i = next; i < chunks.length; i = next) {
        // Consecutive chunks, up to one read's worth, go in one read.
        let last = i;
        while (last + 1 < chunks.length && last - i + 1 < perRead && chunks[last + 1] === chunks[last]! + 1) last++;
        next = last + 1;
        await file.read(buffer, 0, (last - i + 1) * memoryDigestChunkBytes, base + chunks[i]! * memoryDigestChunkBytes);
      }
    };
    await Promise.all(Array.from({ length: inFlight }, reader));
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
    const steps = { status: [] as number[], locate: [] as number[], pageTables: [] as number[], hash: [] as number[], digest: [] as number[] };
    const located = await timed(steps.locate, () => locateGuestRam(vm));
    if (located.kind !== 'process') throw new Error(`this QEMU's RAM is read from a ${located.kind}, not its address space`);
    const hashes = await xxhash();
    const buffer = Buffer.alloc(memoryDigestChunkBytes, 0x5a);
    let read: number[] = [];
    const readings = new Map<string, number[]>();
    const variants = [
      [1, 1],
      [2, 1],
      [4, 1],
      [8, 1],
      [4, 4],
    ] as const;
    for (let round = 0; round < repeat; round++) {
      await timed(steps.status, () => vm.status());
      const zero = await timed(steps.pageTables, () => zeroChunks(vm.pid, located.address, size));
      read = Array.from({ length: memoryMiB }, (_, i) => i).filter((i) => !zero.has(i));
      for (const [inFlight, mib] of variants) {
        const key = `${inFlight} in flight, ${mib} MiB each`;
        const samples = readings.get(key) ?? [];
        readings.set(key, samples);
        await timed(samples, () => readChunks(located.path, located.address, read, inFlight, mib * memoryDigestChunkBytes));
      }
      const hashStarted = performance.now();
      for (let i = 0; i < read.length; i++) hashes.h64Raw(buffer).toString(16).padStart(16, '0');
      steps.hash.push(performance.now() - hashStarted);
      await timed(steps.digest, () => memoryDigest(vm, AbortSignal.timeout(60_000)));
    }
    const ms = (samples: number[]): string => `${median(samples).toFixed(1)} ms`;
    console.log(`chunks read: ${read.length} of ${memoryMiB} (the rest the zero page backs)`);
    console.log(`query-status ${ms(steps.status)}; finding the RAM (memfd scan, gpa2hva; once per QEMU) ${ms(steps.locate)}; ` +
      `page tables (pagemap + kpageflags) ${ms(steps.pageTables)}; hashing ${read.length} MiB ${ms(steps.hash)}`);
    for (const [key, samples] of readings) console.log(`reading ${read.length} MiB, ${key}: ${ms(samples)}`);
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

/**
 * Reproduces the QEMU 7.2 defect behind vmferry's memory comparison, with no
 * vmferry code in the migration path: a plain QMP pre-copy of the test guest
 * between two QEMUs under TCG, then the RAM of both ends (both stopped) dumped
 * with pmemsave and compared page by page. Fast migrations (few passes) match;
 * slow ones (several passes) differ in a few dozen pages and the guest crashes
 * on the destination. docs/QEMU-TCG-PRECOPY.md has the results.
 *
 *   node --import tsx bench/qemu-tcg-precopy.ts [--bandwidths 1000,3] [--runs 2]
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import Table from 'cli-table3';
import { testGuestSpec } from '../src/guest/test-guest.ts';
import type { DiskSpec } from '../src/qemu/spec.ts';
import { makeTempDir } from '../test/support/temp.ts';
import { freePort, isMain, machineLine, withCleanup } from './lib/common.ts';
import { vmferryKnobs } from './lib/plain-command-line.ts';
import { spawnPlainQemu, type PlainQemu } from './lib/plain-qmp.ts';

const memoryMiB = 256;
const pageBytes = 4096;

interface Outcome {
  bandwidthMiBs: number;
  seconds: number;
  passes: number;
  differingPages: number;
  crashed: boolean;
}

const caps = (names: string[]): { capabilities: { capability: string; state: boolean }[] } => ({
  capabilities: names.map((capability) => ({ capability, state: true })),
});

async function migrateOnce(bandwidthMiBs: number): Promise<Outcome> {
  return withCleanup(async (cleanup) => {
    const temp = await makeTempDir('tcg-precopy');
    cleanup.add('remove temp dir', () => temp.remove());
    const image = join(temp.path, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, '64M']);
    // The disk is "shared": both ends open the same file, so only RAM and device state move.
    const disk: DiskSpec = { id: 'disk0', source: { kind: 'file', path: image, format: 'raw' } };
    // The guest keeps touching one byte per page of 16 MiB at 1 MiB/s, like any busy program.
    const guest = { mode: 'workload', spanMiB: 8, dirtyMiB: 16, dirtyRateMiBs: 1 } as const;
    const specA = testGuestSpec('a', [disk], temp.path, guest, memoryMiB);
    const specB = testGuestSpec('b', [disk], temp.path, guest, memoryMiB);
    const a: PlainQemu = await spawnPlainQemu(specA, vmferryKnobs, 'run', join(temp.path, 'runA'));
    cleanup.add('stop QEMU A', () => a.kill());
    const b: PlainQemu = await spawnPlainQemu(specB, vmferryKnobs, 'incoming', join(temp.path, 'runB'));
    cleanup.add('stop QEMU B', () => b.kill());
    const reportA = specA.serialLogs?.[1] ?? '';
    for (let i = 0; i < 120 && !readFileSync(reportA, 'utf8').includes('ACK disk0 10'); i++) await sleep(500);

    await b.qmp.execute('migrate-set-capabilities', caps(['events', 'late-block-activate']));
    const port = await freePort();
    await b.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    await a.qmp.execute('migrate-set-capabilities', caps(['events']));
    await a.qmp.execute('migrate-set-parameters', { 'max-bandwidth': bandwidthMiBs * 1024 * 1024 });
    const started = performance.now();
    await a.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await b.qmp.waitEvent('MIGRATION', (d) => d.status === 'completed', 10 * 60_000);
    const seconds = (performance.now() - started) / 1000;
    const info = await a.qmp.execute<{ ram?: { 'dirty-sync-count': number } }>('query-migrate');

    const dumpA = join(temp.path, 'memory-a');
    const dumpB = join(temp.path, 'memory-b');
    await a.qmp.execute('pmemsave', { val: 0, size: memoryMiB * 1024 * 1024, filename: dumpA });
    await b.qmp.execute('pmemsave', { val: 0, size: memoryMiB * 1024 * 1024, filename: dumpB });
    const memoryA = readFileSync(dumpA);
    const memoryB = readFileSync(dumpB);
    let differingPages = 0;
    for (let offset = 0; offset < memoryA.length; offset += pageBytes) {
      if (!memoryA.subarray(offset, offset + pageBytes).equals(memoryB.subarray(offset, offset + pageBytes))) differingPages++;
    }

    await b.qmp.execute('cont');
    await sleep(8000);
    const console = readFileSync(specB.serialLogs?.[0] ?? '', 'utf8');
    return { bandwidthMiBs, seconds, passes: info.ram?.['dirty-sync-count'] ?? 0, differingPages, crashed: /Kernel panic|BUG:|Oops/.test(console) };
  });
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { bandwidths: { type: 'string', default: '1000,3' }, runs: { type: 'string', default: '2' } } });
  const bandwidths = values.bandwidths.split(',').map(Number);
  const runs = Number(values.runs);
  console.log(`QEMU 7.2 pre-copy under TCG, plain QMP, ${memoryMiB} MiB guest dirtying 16 MiB at 1 MiB/s. ${await machineLine()}`);
  const table = new Table({ head: ['bandwidth MiB/s', 'time s', 'dirty-sync passes', 'pages differing', 'guest crashed at B'] });
  for (const bandwidth of bandwidths) {
    for (let run = 0; run < runs; run++) {
      const o = await migrateOnce(bandwidth);
      table.push([o.bandwidthMiBs, o.seconds.toFixed(1), o.passes, `${o.differingPages} of ${(memoryMiB * 1024 * 1024) / pageBytes}`, o.crashed ? 'yes' : 'no']);
    }
  }
  console.log(table.toString());
}

if (isMain(import.meta.url)) await main();

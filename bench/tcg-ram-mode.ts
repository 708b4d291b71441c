/**
 * Whether stopping the guest escapes QEMU 7.2's TCG pre-copy defect: how often the
 * memory comparison refuses a busy TCG guest's migration in `live` pre-copy that
 * lets the guest run for every pass (`--no-tcg-stop-copy`: several passes while
 * the guest runs, docs/QEMU-TCG-PRECOPY.md), in `live` as planned by default (the
 * guest runs through the first pass only, then QEMU stops it for the rest), and in `stop-and-copy`
 * (the guest stopped before the RAM phase), with the guest's pause each costs.
 * Same guest, same rig, same bandwidth cap, rotating within each round; no retries.
 *
 *   node --import tsx bench/tcg-ram-mode.ts [--runs 4] [--bandwidth 16|none]
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import type { GuestOptions } from '../src/guest/test-guest.ts';
import type { RamMode } from '../src/migration/plan.ts';
import { MigrationRig } from '../test/support/migration-rig.ts';
import { isMain, machineLine, median } from './lib/common.ts';

/** A RAM mode as the bench runs it: `live` with or without the stop after the first pass. */
interface Variant {
  name: string;
  ramMode: RamMode;
  tcgStopCopy: boolean;
}

const variants: Variant[] = [
  { name: 'live, guest runs every pass', ramMode: 'live', tcgStopCopy: false },
  { name: 'live, stopped after pass 1', ramMode: 'live', tcgStopCopy: true },
  { name: 'stop-and-copy', ramMode: 'stop-and-copy', tcgStopCopy: true },
];

interface Outcome {
  variant: string;
  /** completed, memory differed, or another ending with its error code. */
  result: string;
  passes: number;
  pauseMs: number | undefined;
  totalMs: number;
}

/** The busy guest of bench/tcg-downtime-start.ts: records on both disks, bulk writes, 64 MiB of memory kept dirty. */
const busyGuest: GuestOptions = { mode: 'workload', spanMiB: 8, bulkMiBs: 8, bulkDisks: ['local0', 'shared0'], dirtyMiB: 64 };

async function migrateOnce(name: string, variant: Variant, bandwidthMiBs: number | undefined): Promise<Outcome> {
  const rig = await MigrationRig.start(name, { local: [{ id: 'local0', sizeMiB: 256, fillMiB: 32 }], shared: [{ id: 'shared0', sizeMiB: 256 }] }, busyGuest);
  try {
    await rig.waitForAcks(20);
    // Long enough for the guest to touch its whole dirty area before the migration starts.
    await sleep(8000);
    const plan = await rig.plan({ ramMode: variant.ramMode, tcgStopCopy: variant.tcgStopCopy, ...(bandwidthMiBs === undefined ? {} : { bandwidthMiBs }) });
    const report = await rig.migrate(plan, { memoryMismatchRetries: 0 });
    return {
      variant: variant.name,
      result: report.outcome === 'completed' ? 'completed' : report.error?.code === 'VMF_MEMORY_MISMATCH' ? 'memory differed' : `${report.outcome}: ${report.error?.code ?? ''}`,
      passes: report.ram.passes,
      pauseMs: report.pauseMs,
      totalMs: report.totalMs,
    };
  } finally {
    await rig.cleanup.run();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '4' }, bandwidth: { type: 'string', default: '16' } } });
  const runs = Number(values.runs);
  const bandwidthMiBs = values.bandwidth === 'none' ? undefined : Number(values.bandwidth);
  if (bandwidthMiBs !== undefined && !(bandwidthMiBs > 0)) throw new Error(`--bandwidth must be a positive number of MiB/s or "none" (got "${values.bandwidth}")`);
  const cap = bandwidthMiBs === undefined ? 'no bandwidth cap' : `${bandwidthMiBs} MiB/s`;
  console.log(`\n== TCG: live pre-copy, live stopped after its first pass, stop-and-copy (busy 256 MiB guest, ${cap}, ${runs} run(s) each)\n${await machineLine()}`);
  const outcomes: Outcome[] = [];
  for (let run = 0; run < runs; run++) {
    // Rotate which goes first, so drift in the machine's load falls on all.
    const order = [...variants.slice(run % variants.length), ...variants.slice(0, run % variants.length)];
    for (const variant of order) {
      const outcome = await migrateOnce(`tcgrm${run}${variants.indexOf(variant)}`, variant, bandwidthMiBs);
      console.log(`  run ${run + 1}, ${variant.name}: ${outcome.result}, ${outcome.passes} passes, guest paused ${outcome.pauseMs ?? '-'} ms, ${(outcome.totalMs / 1000).toFixed(1)} s`);
      outcomes.push(outcome);
    }
  }
  const rows = variants.map(({ name }) => {
    const mine = outcomes.filter((o) => o.variant === name);
    const completed = mine.filter((o) => o.result === 'completed');
    return [
      name,
      mine.length,
      completed.length,
      mine.filter((o) => o.result === 'memory differed').length,
      median(mine.map((o) => o.passes)),
      completed.length ? Math.round(median(completed.map((o) => o.pauseMs ?? 0))) : '-',
      (median(mine.map((o) => o.totalMs)) / 1000).toFixed(1),
    ];
  });
  console.log(table(['RAM mode', 'runs', 'completed', 'memory differed', 'passes (median)', 'guest paused ms (median, completed)', 'total s (median)'], rows));
}

if (isMain(import.meta.url)) await main();

/**
 * Whether stop-and-copy escapes QEMU 7.2's TCG pre-copy defect: how often the
 * memory comparison refuses a busy TCG guest's migration in `live` pre-copy
 * (several passes while the guest runs: docs/QEMU-TCG-PRECOPY.md) against
 * `stop-and-copy` (the guest stopped before the RAM phase, so nothing is dirtied
 * behind QEMU's back), with the guest's pause each costs. Same guest, same rig,
 * same bandwidth cap, alternating within each round; no retries.
 *
 *   node --import tsx bench/tcg-ram-mode.ts [--runs 4] [--bandwidth 16]
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import type { GuestOptions } from '../src/guest/test-guest.ts';
import type { RamMode } from '../src/migration/plan.ts';
import { MigrationRig } from '../test/support/migration-rig.ts';
import { isMain, machineLine, median } from './lib/common.ts';

interface Outcome {
  mode: RamMode;
  /** completed, memory differed, or another ending with its error code. */
  result: string;
  passes: number;
  pauseMs: number | undefined;
}

/** The busy guest of bench/tcg-downtime-start.ts: records on both disks, bulk writes, 64 MiB of memory kept dirty. */
const busyGuest: GuestOptions = { mode: 'workload', spanMiB: 8, bulkMiBs: 8, bulkDisks: ['local0', 'shared0'], dirtyMiB: 64 };

async function migrateOnce(name: string, mode: RamMode, bandwidthMiBs: number): Promise<Outcome> {
  const rig = await MigrationRig.start(name, { local: [{ id: 'local0', sizeMiB: 256, fillMiB: 32 }], shared: [{ id: 'shared0', sizeMiB: 256 }] }, busyGuest);
  try {
    await rig.waitForAcks(20);
    // Long enough for the guest to touch its whole dirty area before the migration starts.
    await sleep(8000);
    const report = await rig.migrate(await rig.plan({ ramMode: mode, bandwidthMiBs }), { memoryMismatchRetries: 0 });
    return {
      mode,
      result: report.outcome === 'completed' ? 'completed' : report.error?.code === 'VMF_MEMORY_MISMATCH' ? 'memory differed' : `${report.outcome}: ${report.error?.code ?? ''}`,
      passes: report.ram.passes,
      pauseMs: report.pauseMs,
    };
  } finally {
    await rig.cleanup.run();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '4' }, bandwidth: { type: 'string', default: '16' } } });
  const runs = Number(values.runs);
  const bandwidthMiBs = Number(values.bandwidth);
  const modes: RamMode[] = ['live', 'stop-and-copy'];
  console.log(`\n== TCG: live pre-copy against stop-and-copy (busy 256 MiB guest, ${bandwidthMiBs} MiB/s, ${runs} run(s) each)\n${await machineLine()}`);
  const outcomes: Outcome[] = [];
  for (let run = 0; run < runs; run++) {
    // Alternate which goes first, so drift in the machine's load falls on both.
    for (const mode of run % 2 === 0 ? modes : [...modes].reverse()) {
      const outcome = await migrateOnce(`tcgrm${run}${mode === 'live' ? 'l' : 's'}`, mode, bandwidthMiBs);
      console.log(`  run ${run + 1}, ${mode}: ${outcome.result}, ${outcome.passes} passes, guest paused ${outcome.pauseMs ?? '-'} ms`);
      outcomes.push(outcome);
    }
  }
  const rows = modes.map((mode) => {
    const mine = outcomes.filter((o) => o.mode === mode);
    const completed = mine.filter((o) => o.result === 'completed');
    return [
      mode,
      mine.length,
      completed.length,
      mine.filter((o) => o.result === 'memory differed').length,
      median(mine.map((o) => o.passes)),
      completed.length ? Math.round(median(completed.map((o) => o.pauseMs ?? 0))) : '-',
    ];
  });
  console.log(table(['RAM mode', 'runs', 'completed', 'memory differed', 'passes (median)', 'guest paused ms (median, completed)'], rows));
}

if (isMain(import.meta.url)) await main();

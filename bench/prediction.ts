/**
 * How far the dry run's prediction (src/migration/prediction.ts) is from what happens: for each case, the
 * test guest dirtying its memory at a set rate, the plan capped at a set bandwidth, the source's agent
 * measures the guest as a dry run does (src/migration/probe.ts measureGuestRam), the prediction is made,
 * and then the migration runs for real (the in-process rig: both hosts on this machine, TCG, no retries).
 * Prints predicted against actual total time, RAM passes and pause, the error in %, and whether the
 * decision (pre-copy converges, or is rolled back at its --timeout) was right.
 *
 *   node --import tsx bench/prediction.ts [--cases 0,1,2,3,4]
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import type { GuestOptions } from '../src/guest/test-guest.ts';
import { capOf, predictMigration, type Prediction } from '../src/migration/prediction.ts';
import { measureGuestRam } from '../src/migration/probe.ts';
import { MigrationRig } from '../test/support/migration-rig.ts';
import { isMain, machineLine } from './lib/common.ts';

interface Case {
  /** MiB the guest keeps dirtying, and how fast (MiB/s); 0: idle. */
  dirtyMiB: number;
  dirtyRateMiBs: number;
  bandwidthMiBs: number;
  /** false: pre-copy passes while the guest runs until it converges (as for KVM guests), instead of TCG's one pass. */
  tcgStopCopy: boolean;
  timeoutS?: number;
}

/**
 * TCG's default (one pass while the guest runs) from idle to busy, each capped well below what QEMU moves uncapped
 * here; then pre-copy as KVM guests run it, once converging and once dirtying faster than the cap (rolled back at
 * its --timeout). Those two may be refused for QEMU 7.2's TCG defect (docs/QEMU-TCG-PRECOPY.md): refused at the
 * switch-over, pre-copy did converge.
 */
const cases: Case[] = [
  { dirtyMiB: 0, dirtyRateMiBs: 0, bandwidthMiBs: 32, tcgStopCopy: true },
  { dirtyMiB: 128, dirtyRateMiBs: 4, bandwidthMiBs: 32, tcgStopCopy: true },
  { dirtyMiB: 128, dirtyRateMiBs: 8, bandwidthMiBs: 16, tcgStopCopy: true },
  { dirtyMiB: 64, dirtyRateMiBs: 1, bandwidthMiBs: 64, tcgStopCopy: false },
  { dirtyMiB: 128, dirtyRateMiBs: 16, bandwidthMiBs: 8, tcgStopCopy: false, timeoutS: 20 },
];

interface Outcome {
  prediction: Prediction;
  outcome: string;
  totalMs: number;
  passes: number;
  downtimeMs: number | undefined;
  pauseMs: number | undefined;
  /** Pre-copy reached the switch-over (completed, or refused there for a memory mismatch). */
  converged: boolean;
}

async function runCase(name: string, c: Case): Promise<Outcome> {
  const guest: GuestOptions = { mode: 'workload', spanMiB: 8, ...(c.dirtyMiB > 0 ? { dirtyMiB: c.dirtyMiB, dirtyRateMiBs: c.dirtyRateMiBs } : {}) };
  const rig = await MigrationRig.start(name, { local: [{ id: 'local0', sizeMiB: 256, fillMiB: 32 }], shared: [] }, guest);
  try {
    await rig.waitForAcks(10);
    // The guest's dirtying runs at its set rate from boot; a few seconds more so the measurement sees it steady.
    await sleep(3000);
    const plan = await rig.plan({ bandwidthMiBs: c.bandwidthMiBs, tcgStopCopy: c.tcgStopCopy, ...(c.timeoutS === undefined ? {} : { timeoutS: c.timeoutS }) });
    const prediction = predictMigration(plan, await measureGuestRam(rig.source), capOf(plan));
    const report = await rig.migrate(plan, { memoryMismatchRetries: 0 });
    return {
      prediction,
      outcome: report.outcome === 'completed' ? 'completed' : `${report.outcome}: ${report.error?.code ?? ''}`,
      totalMs: report.totalMs,
      passes: report.ram.passes,
      downtimeMs: report.downtimeMs,
      pauseMs: report.pauseMs,
      converged: report.outcome === 'completed' || report.error?.code === 'VMF_MEMORY_MISMATCH',
    };
  } finally {
    await rig.cleanup.run();
  }
}

function errorPercent(predicted: number | undefined, actual: number | undefined): string {
  if (predicted === undefined || actual === undefined || actual === 0) return '-';
  const pct = ((predicted - actual) / actual) * 100;
  return `${pct >= 0 ? '+' : ''}${pct.toFixed(0)} %`;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { cases: { type: 'string', default: cases.map((_, i) => i).join(',') } } });
  const chosen = values.cases.split(',').map((v) => {
    const c = cases[Number(v)];
    if (!c) throw new Error(`--cases: no case ${v} (0–${cases.length - 1})`);
    return c;
  });
  console.log(`\n== Prediction against actual: ${chosen.length} migration(s) of the 256 MiB test guest with a 256 MiB local disk (32 MiB written), TCG, in-process rig\n${await machineLine()}`);
  const rows: (string | number)[][] = [];
  let rightDecisions = 0;
  for (const [i, c] of chosen.entries()) {
    const o = await runCase(`predict${i}`, c);
    const p = o.prediction;
    const right = p.converges === o.converged;
    if (right) rightDecisions++;
    const guest = `${c.dirtyMiB === 0 ? 'idle' : `${c.dirtyRateMiBs} MiB/s over ${c.dirtyMiB} MiB`}${c.tcgStopCopy ? '' : `, every pass live${c.timeoutS ? `, --timeout ${c.timeoutS}` : ''}`}`;
    console.log(`  case ${i}: ${guest}, cap ${c.bandwidthMiBs} MiB/s: ${o.outcome}; measured dirty rate ${(p.dirtyRateBytesPerS / 1048576).toFixed(0)} MiB/s, RAM in use ${(p.ramBytes / 1048576).toFixed(0)} MiB`);
    rows.push([
      guest,
      c.bandwidthMiBs,
      `${(p.dirtyRateBytesPerS / 1048576).toFixed(0)}`,
      `${((p.totalMs ?? 0) / 1000).toFixed(1)} / ${(o.totalMs / 1000).toFixed(1)}`,
      errorPercent(p.totalMs, o.totalMs),
      `${p.passes ?? '-'} / ${o.passes}`,
      `${p.pauseMs ?? '-'} / ${o.downtimeMs ?? '-'} (${o.pauseMs ?? '-'})`,
      `${p.converges ? 'yes' : 'no'} / ${o.converged ? 'yes' : 'no'}${right ? '' : ' WRONG'}`,
    ]);
  }
  console.log(
    table(
      ['guest dirtying', 'cap MiB/s', 'measured MiB/s', 'total s predicted / actual', 'error', 'passes predicted / actual', "RAM pause ms predicted (at most) / QEMU's downtime (guest paused)", 'converges: predicted / actual'],
      rows,
    ),
  );
  console.log(`decision right in ${rightDecisions} of ${chosen.length}`);
}

if (isMain(import.meta.url)) await main();

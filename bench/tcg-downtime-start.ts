/**
 * Why vmferry starts TCG guests at the largest downtime limit: how often the
 * memory comparison refuses a busy TCG guest's migration when pre-copy starts
 * at a low limit and climbs (KVM's ladder, 75 → 150 → 300 ms) against starting
 * at 300 ms. More passes while the guest runs mean more chances for QEMU 7.2's
 * TCG defect to lose a write (docs/QEMU-TCG-PRECOPY.md). Same guest, same
 * rig, alternating within each round.
 *
 *   node --import tsx bench/tcg-downtime-start.ts [--runs 6] [--max-downtime 300]
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import type { GuestOptions } from '../src/guest/test-guest.ts';
import { runMigration } from '../src/migration/executor.ts';
import { downtimeSteps } from '../src/migration/convergence.ts';
import { QemuDestination } from '../src/migration/qemu-destination.ts';
import { QemuSource } from '../src/migration/qemu-source.ts';
import type { MigrationInfo } from '../src/qmp/commands.ts';
import { MigrationRig } from '../test/support/migration-rig.ts';
import { isMain, machineLine, median } from './lib/common.ts';

interface Outcome {
  limits: string;
  /** completed, memory differed, or another ending with its error code. */
  result: string;
  passes: number;
  downtimeMs: number | undefined;
  differingChunks: number;
}

/** The busy guest of bench/migration.ts's "writing" scenario, at the rig's 256 MiB. */
const busyGuest: GuestOptions = { mode: 'workload', spanMiB: 8, bulkMiBs: 8, bulkDisks: ['local0', 'shared0'], dirtyMiB: 64 };

async function migrateOnce(name: string, downtimeLimitsMs: number[]): Promise<Outcome> {
  const rig = await MigrationRig.start(name, { local: [{ id: 'local0', sizeMiB: 512, fillMiB: 150 }], shared: [{ id: 'shared0', sizeMiB: 1024 }] }, busyGuest);
  try {
    await rig.waitForAcks(20);
    // Long enough for the guest to touch its whole dirty area before the migration starts.
    await sleep(8000);
    const planned = await rig.plan();
    const plan = { ...planned, ram: { ...planned.ram, downtimeLimitsMs } };
    rig.destination = new QemuDestination({ hostId: 'B', pool: rig.poolB, vmDir: (vm) => join(rig.dir, 'runB', vm), address: '127.0.0.1' });
    const report = await runMigration({ spec: rig.spec, plan, source: new QemuSource({ hostId: 'A', vm: rig.source }), destination: rig.destination });
    let passes = report.ram.passes;
    if (report.outcome !== 'completed') {
      // Rolled back: the source still runs and remembers the migration it cancelled.
      const info = await rig.source.qmp('reading the cancelled migration', (qmp) => qmp.client.execute<MigrationInfo>('query-migrate'));
      passes = info.ram?.['dirty-sync-count'] ?? 0;
    }
    const differing = /in (\d+) of \d+ 1 MiB chunks/.exec(report.error?.message ?? '');
    return {
      limits: downtimeLimitsMs.join(' → '),
      result: report.outcome === 'completed' ? 'completed' : report.error?.code === 'VMF_MEMORY_MISMATCH' ? 'memory differed' : `${report.outcome}: ${report.error?.code ?? ''}`,
      passes,
      downtimeMs: report.downtimeMs,
      differingChunks: Number(differing?.[1] ?? 0),
    };
  } finally {
    await rig.cleanup.run();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '6' }, 'max-downtime': { type: 'string', default: '300' } } });
  const runs = Number(values.runs);
  const maxDowntimeMs = Number(values['max-downtime']);
  const ladders = [downtimeSteps(maxDowntimeMs), [maxDowntimeMs]];
  console.log(`\n== TCG: where pre-copy's downtime limit starts (busy 256 MiB guest, ${runs} run(s) each)\n${await machineLine()}`);
  const outcomes: Outcome[] = [];
  for (let run = 0; run < runs; run++) {
    // Alternate which goes first, so drift in the machine's load falls on both.
    for (const limits of run % 2 === 0 ? ladders : [...ladders].reverse()) {
      const outcome = await migrateOnce(`tcgds${run}${limits.length}`, limits);
      console.log(`  run ${run + 1}, limits ${outcome.limits} ms: ${outcome.result}, ${outcome.passes} passes, downtime ${outcome.downtimeMs ?? '-'} ms`);
      outcomes.push(outcome);
    }
  }
  const rows = ladders.map((limits) => {
    const mine = outcomes.filter((o) => o.limits === limits.join(' → '));
    const completed = mine.filter((o) => o.result === 'completed');
    const differed = mine.filter((o) => o.result === 'memory differed');
    return [
      `${limits.join(' → ')} ms`,
      mine.length,
      completed.length,
      differed.length,
      differed.length ? differed.map((o) => o.differingChunks).join(', ') : '-',
      median(mine.map((o) => o.passes)),
      completed.length ? Math.round(median(completed.map((o) => o.downtimeMs ?? 0))) : '-',
    ];
  });
  console.log(table(['downtime limits', 'runs', 'completed', 'memory differed', 'chunks differing', 'passes (median)', 'downtime ms (median, completed)'], rows));
}

if (isMain(import.meta.url)) await main();

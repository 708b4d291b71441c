/**
 * The same migration with the shared disk on Ceph RBD and on vmferry's own NBD
 * storage server: a VM with a local root disk (mirrored) and a 32 MiB shared
 * data disk (re-attached), the test guest writing to both, migrated A → B
 * in-process (test/support/migration-rig.ts) with the default options. Prints
 * vmferry's total time, the guest's pause as QEMU measured it, and the bytes
 * sent for each disk (0 for the shared one), and two phases: preparing (B's
 * QEMU starts and opens the shared disk) and resume-sent (from B's go to its
 * confirmation that the guest runs: for RBD this holds the switch-over fence,
 * and the guest is paused through it, after QEMU's downtime figure ended). The kinds alternate, round after
 * round, on one throwaway Ceph cluster (src/demo/ceph.ts).
 *
 *   node --import tsx bench/rbd-migration.ts [--rounds 1]
 */
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { startCeph } from '../src/demo/ceph.ts';
import type { MigrationReport } from '../src/migration/phases.ts';
import { MigrationRig, type RigLayout } from '../test/support/migration-rig.ts';
import { machineLine, withCleanup } from './lib/common.ts';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '1' } } });
const rounds = Number(values.rounds);
if (!Number.isInteger(rounds) || rounds <= 0) throw new Error(`--rounds must be a positive whole number (got ${String(values.rounds)})`);

async function migrateOnce(name: string, layout: RigLayout): Promise<MigrationReport> {
  const rig = await MigrationRig.start(name, layout, { mode: 'workload', spanMiB: 8 });
  try {
    await rig.waitForAcks(20);
    const report = await rig.migrate(await rig.plan());
    if (report.outcome !== 'completed') throw new Error(`the ${name} migration ended ${report.outcome}: ${report.error?.message ?? ''}`);
    return report;
  } finally {
    await rig.cleanup.run();
  }
}

function phaseMs(report: MigrationReport, phase: string): string {
  const timing = report.phases.find((p) => p.phase === phase);
  return timing ? `${timing.durationMs} ms` : '-';
}

await withCleanup(async (cleanup) => {
  console.log(`\n== One migration, the shared disk on Ceph RBD and on vmferry's NBD server, ${rounds} round(s)`);
  console.log(await machineLine());
  const ceph = await startCeph();
  cleanup.add('stop the Ceph cluster', () => ceph.stop());
  const root = [{ id: 'root', sizeMiB: 64, fillMiB: 4 }];
  const rows: string[][] = [];
  for (let round = 1; round <= rounds; round++) {
    const kinds: [string, RigLayout][] = [
      ['NBD (vmferry storage)', { local: root, shared: [{ id: 'data', sizeMiB: 32 }] }],
      ['Ceph RBD', { local: root, shared: [], rbd: [{ id: 'data', sizeMiB: 32, client: ceph.client, pool: ceph.pool }] }],
    ];
    // Which goes first swaps every round, so a load that comes and goes hits both alike.
    if (round % 2 === 0) kinds.reverse();
    for (const [kind, layout] of kinds) {
      const report = await migrateOnce(kind.startsWith('NBD') ? 'bnbd' : 'brbd', layout);
      const bytes = (id: string): string => String(report.disks.find((d) => d.id === id)?.bytesSent ?? '-');
      rows.push([String(round), kind, `${(report.totalMs / 1000).toFixed(1)} s`, report.downtimeMs === undefined ? '-' : `${report.downtimeMs} ms`, bytes('root'), bytes('data'), phaseMs(report, 'preparing'), phaseMs(report, 'resume-sent')]);
    }
  }
  console.log(table(['round', 'shared disk on', 'total', 'pause (QEMU downtime)', 'root: bytes sent', 'shared: bytes sent', 'preparing', 'resume-sent'], rows));
});

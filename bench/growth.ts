/**
 * How migration cost grows, vmferry only, idle guest:
 *   - with the local disk's allocation (256 MiB, 1 GiB, 4 GiB written into a
 *     qcow2 of allocation + 1 GiB, at least 2 GiB): time should follow the bytes;
 *   - with the shared volume's size (1 → 16 GiB, sparse, 256 MiB local): time
 *     must not change, since nothing of it is copied. Each size runs twice
 *     (sizes up, then down) and a fitted slope says how much size adds.
 *
 *   node --import tsx bench/growth.ts [--small]
 *
 * --small: local 64 / 256 / 1024 MiB and shared 1 / 4 / 16 GiB, 256 MiB RAM.
 */
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { aim, isMain, machineLine, median, mib, seconds, toMiB } from './lib/common.ts';
import { runOnce } from './lib/migration-run.ts';
import type { RunResult, Scenario } from './lib/run-types.ts';

const idle = { mode: 'workload', spanMiB: 8, intervalMs: 1000 } as const;

function phaseSeconds(run: RunResult, phase: string, next: string): number {
  const start = run.marks.find((m) => m.label === phase)?.t;
  const end = run.marks.find((m) => m.label === next)?.t;
  return start !== undefined && end !== undefined ? (end - start) / 1000 : Number.NaN;
}

export async function growthBench(options: { small: boolean }): Promise<{ local: RunResult[]; shared: { gib: number; run: RunResult }[] }> {
  const memoryMiB = options.small ? 256 : 512;
  const allocations = options.small ? [64, 256, 1024] : [256, 1024, 4096];
  const sharedGiB = options.small ? [1, 4, 16] : [1, 2, 4, 8, 16];
  const localForShared = options.small ? 64 : 256;
  console.log(`\n== Growth: migration time vs local allocation and vs shared volume size (vmferry, idle guest, ${memoryMiB} MiB RAM)`);
  console.log(await machineLine());

  const local: RunResult[] = [];
  for (const allocMiB of allocations) {
    const scenario: Scenario = {
      name: `grow-local-${allocMiB}`,
      memoryMiB,
      localSizeMiB: Math.max(2048, allocMiB + 1024),
      localFillMiB: allocMiB,
      sharedSizeMiB: 4096,
      guest: idle,
      warmupAcks: 3,
    };
    const run = await runOnce('vmferry', scenario);
    console.log(`  local ${allocMiB} MiB: total ${seconds(run.totalMs)} s`);
    local.push(run);
  }
  const base = local[0] as RunResult;
  console.log(table(
    ['local allocated MiB', 'disk size MiB', 'total s', 'mirroring s', 'mirror MiB', 'mirror MiB/s', 'RAM pre-copy s', 'total ÷ smallest'],
    local.map((run, i) => {
      const mirroring = phaseSeconds(run, 'mirroring', 'migrating');
      return [
        toMiB(run.localAllocatedBytes),
        Math.max(2048, (allocations[i] as number) + 1024),
        seconds(run.totalMs),
        mirroring.toFixed(2),
        toMiB(run.mirrorBytes),
        (run.mirrorBytes / mib / mirroring).toFixed(0),
        phaseSeconds(run, 'migrating', 'paused-at-switchover').toFixed(2),
        (run.totalMs / base.totalMs).toFixed(2),
      ];
    }),
  ));

  // Up then down again: drift of the machine's load over the run falls on every size alike.
  const shared: { gib: number; run: RunResult }[] = [];
  for (const gib of [...sharedGiB, ...[...sharedGiB].reverse()]) {
    const scenario: Scenario = {
      name: `grow-shared-${gib}`,
      memoryMiB,
      localSizeMiB: 2048,
      localFillMiB: localForShared,
      sharedSizeMiB: gib * 1024,
      guest: idle,
      warmupAcks: 3,
    };
    const run = await runOnce('vmferry', scenario);
    console.log(`  shared ${gib} GiB: total ${seconds(run.totalMs)} s`);
    shared.push({ gib, run });
  }
  const perSize = sharedGiB.map((gib) => {
    const runs = shared.filter((s) => s.gib === gib).map((s) => s.run);
    return { gib, runs, totalMs: median(runs.map((r) => r.totalMs)) };
  });
  const first = perSize[0] as { totalMs: number };
  console.log(table(
    ['shared GiB (sparse)', 'total s (each run)', 'total s (median)', 'mirror MiB', 'shared bytes copied', 'downtime ms', 'median ÷ 1 GiB'],
    perSize.map((p) => [
      p.gib,
      p.runs.map((r) => seconds(r.totalMs)).join(', '),
      seconds(p.totalMs),
      p.runs.map((r) => toMiB(r.mirrorBytes)).join(', '),
      p.runs.map((r) => r.sharedBytes).join(', '),
      p.runs.map((r) => Math.round(r.downtimeMs)).join(', '),
      (p.totalMs / first.totalMs).toFixed(2),
    ]),
  ));
  // Least-squares slope of total time against volume size, over every run.
  const xs = shared.map((s) => s.gib);
  const ys = shared.map((s) => s.run.totalMs);
  const mx = xs.reduce((a, b) => a + b, 0) / xs.length;
  const my = ys.reduce((a, b) => a + b, 0) / ys.length;
  const slope = xs.reduce((acc, x, i) => acc + (x - mx) * ((ys[i] as number) - my), 0) / xs.reduce((acc, x) => acc + (x - mx) ** 2, 0);
  const added = (slope * ((sharedGiB.at(-1) as number) - (sharedGiB[0] as number))) / 1000;
  console.log(aim(Math.abs(added) <= 0.1 * (my / 1000), `shared volume size does not change the time: fitted slope ${slope.toFixed(1)} ms per GiB, ` +
    `i.e. ${added.toFixed(2)} s from ${sharedGiB[0]} to ${sharedGiB.at(-1)} GiB (≤ 10% of the mean ${seconds(my)} s)`));
  console.log(aim(shared.every((s) => s.run.sharedBytes === 0), 'shared bytes copied: 0 at every size'));
  return { local, shared };
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({ options: { small: { type: 'boolean', default: false } } });
  await growthBench({ small: values.small ?? false });
}

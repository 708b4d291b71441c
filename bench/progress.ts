/**
 * Progress plot: one vmferry migration of the benchmark VM with the guest
 * writing to both disks, sampled every 50 ms on the source (query-block-jobs,
 * query-migrate), drawn as bytes remaining over time per disk and for RAM,
 * with vmferry's phases as markers. Written as SVG by hand (bench/lib/svg.ts).
 *
 *   node --import tsx bench/progress.ts [--small] [--out docs/migration-progress.svg]
 */
import { writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { isMain, machineLine, mib, seconds, toMiB } from './lib/common.ts';
import { runOnce } from './lib/migration-run.ts';
import type { RunResult } from './lib/run-types.ts';
import { lineChart, type Series } from './lib/svg.ts';
import { migrationScenarios } from './migration.ts';

export function progressChart(run: RunResult, subtitle: string): string {
  const at = (t: number): number => t / 1000;
  const local: Series = { name: 'local0 (mirror)', color: '#1f77b4', points: [] };
  const ram: Series = { name: 'RAM (pre-copy)', color: '#d62728', points: [] };
  let mirrorSeen = false;
  for (const sample of run.samples) {
    const job = sample.jobs.find((j) => j.device === 'mirror-local0');
    if (job) {
      mirrorSeen = true;
      local.points.push({ x: at(sample.t), y: (job.len - job.offset) / mib });
    } else if (mirrorSeen) {
      // The job is gone once cancelled at the switch-over: nothing left to copy.
      local.points.push({ x: at(sample.t), y: 0 });
    }
    if (sample.ram && sample.ram.total > 0) ram.points.push({ x: at(sample.t), y: sample.ram.remaining / mib });
  }
  const end = at(run.totalMs);
  const shared: Series = { name: 'shared0 (re-attached, 0 B)', color: '#2ca02c', dashed: true, points: [{ x: 0, y: 0 }, { x: end, y: 0 }] };
  const markers = run.marks.filter((m) => m.label !== 'planned').map((m) => ({ x: at(m.t), label: m.label }));
  return lineChart({
    title: 'vmferry: bytes remaining during one live migration',
    subtitle,
    xLabel: 'seconds since the migration was requested',
    yLabel: 'MiB remaining',
    series: [local, ram, shared],
    markers,
  });
}

export async function progressBench(options: { small: boolean; out: string }): Promise<RunResult> {
  const scenario = migrationScenarios(options.small).find((s) => s.name === 'writing');
  if (!scenario) throw new Error('no writing scenario');
  console.log(`\n== Progress of one migration (${scenario.memoryMiB} MiB RAM, local ${scenario.localSizeMiB} MiB with ${scenario.localFillMiB} MiB written, shared ${scenario.sharedSizeMiB} MiB, guest writing)`);
  const machine = await machineLine();
  console.log(machine);
  const run = await runOnce('vmferry', scenario, { sampleMs: 50 });
  const subtitle = `${scenario.memoryMiB} MiB RAM, local qcow2 with ${scenario.localFillMiB} MiB written, shared volume ${scenario.sharedSizeMiB / 1024} GiB, guest writing to both\n` +
    `total ${seconds(run.totalMs)} s, downtime ${Math.round(run.downtimeMs)} ms · sampled every 50 ms on the source · ${machine.slice(0, 10)}, 2-core TCG`;
  await writeFile(options.out, progressChart(run, subtitle));
  // A coarse text version of the same data, every ~250 ms.
  const rows: (string | number)[][] = [];
  let next = 0;
  for (const sample of run.samples) {
    if (sample.t < next) continue;
    next = sample.t + 250;
    const job = sample.jobs.find((j) => j.device === 'mirror-local0');
    rows.push([seconds(sample.t), job ? toMiB(job.len - job.offset) : '-', sample.ram ? toMiB(sample.ram.remaining) : '-', sample.ram?.status ?? '-']);
  }
  console.log(table(['t s', 'local0 remaining MiB', 'RAM remaining MiB', 'migration'], rows));
  console.log(`phases: ${run.marks.map((m) => `${m.label} ${seconds(m.t)} s`).join(', ')}`);
  console.log(`wrote ${options.out}`);
  return run;
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({ options: { small: { type: 'boolean', default: false }, out: { type: 'string', default: 'docs/migration-progress.svg' } } });
  await progressBench({ small: values.small ?? false, out: values.out ?? 'docs/migration-progress.svg' });
}

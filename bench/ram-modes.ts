/**
 * A guest that dirties its memory faster than the link carries it: pre-copy
 * alone never converges, so every method needs a way out. vmferry's three
 * (post-copy, stop-and-copy, and live pre-copy, which for a TCG guest runs one
 * pass while the guest runs and then stops it) side by side with libvirt's two
 * (`--postcopy --postcopy-after-precopy`, `--timeout N --timeout-suspend`), on
 * the same VM, guest and bandwidth cap, in one run. Methods rotate within each
 * round so the machine's noise falls on all. What each column counts:
 * bench/lib/migration-run.ts; the post-copy phase is vmferry's report figure
 * (QEMU's postcopy-active to completed), libvirt does not publish one.
 *
 *   node --import tsx bench/ram-modes.ts [--rounds 2] [--bandwidth 16] [--timeout 10] [--no-libvirt]
 */
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import type { MigrationOptions } from '../src/migration/plan.ts';
import { isMain, machineLine, median, seconds, withCleanup } from './lib/common.ts';
import { libvirtMissing, startLibvirtHosts, type LibvirtHosts } from './lib/libvirt.ts';
import { runOnce } from './lib/migration-run.ts';
import type { RunResult, Scenario } from './lib/run-types.ts';

interface Way {
  label: string;
  method: 'vmferry' | 'libvirt';
  vmferry?: Partial<MigrationOptions>;
  libvirtFlags?: string[];
}

interface Outcome {
  way: string;
  result: RunResult | undefined;
  /** Why the run did not complete, when it did not. */
  failure?: string;
}

/** 64 MiB of RAM rewritten at 64 MiB/s and small durable records on both disks: faster than any cap below it. */
function outrunScenario(): Scenario {
  return {
    name: 'outrun',
    memoryMiB: 256,
    localSizeMiB: 512,
    localFillMiB: 64,
    sharedSizeMiB: 1024,
    guest: { mode: 'workload', spanMiB: 8, intervalMs: 15, dirtyMiB: 64, dirtyRateMiBs: 64 },
    warmupAcks: 20,
    warmupMs: 4000,
  };
}

function ways(bandwidthMiBs: number, timeoutS: number): Way[] {
  const capped = { bandwidthMiBs };
  const libvirtCap = ['--bandwidth', String(bandwidthMiBs)];
  return [
    { label: 'vmferry post-copy', method: 'vmferry', vmferry: { ...capped, ramMode: 'postcopy' } },
    { label: 'libvirt post-copy', method: 'libvirt', libvirtFlags: [...libvirtCap, '--postcopy', '--postcopy-after-precopy', '--postcopy-bandwidth', String(bandwidthMiBs)] },
    { label: 'vmferry stop-and-copy', method: 'vmferry', vmferry: { ...capped, ramMode: 'stop-and-copy' } },
    // Under TCG, live pre-copy runs one pass while the guest runs and then stops it (plan.ram.stopAfterFirstPass).
    { label: 'vmferry live (TCG: 1 pass, then stopped)', method: 'vmferry', vmferry: { ...capped } },
    { label: `libvirt suspend at ${timeoutS} s`, method: 'libvirt', libvirtFlags: [...libvirtCap, '--timeout', String(timeoutS), '--timeout-suspend'] },
  ];
}

async function runWay(way: Way, scenario: Scenario, libvirt: LibvirtHosts | undefined): Promise<Outcome> {
  try {
    const result = await runOnce(way.method, scenario, {
      ...(way.vmferry ? { vmferry: way.vmferry } : {}),
      ...(libvirt ? { libvirt } : {}),
      ...(way.libvirtFlags ? { libvirtMigrateFlags: way.libvirtFlags } : {}),
    });
    return { way: way.label, result };
  } catch (err) {
    // A migration that does not complete is this benchmark's finding, not a crash of it.
    return { way: way.label, result: undefined, failure: String(err).split('\n')[0]?.slice(0, 160) ?? 'failed' };
  }
}

const ms = (value: number | undefined): string => (value === undefined || Number.isNaN(value) ? '-' : String(Math.round(value)));

export async function ramModesBench(rounds: number, bandwidthMiBs: number, timeoutS: number, withLibvirt: boolean): Promise<Outcome[]> {
  const scenario = outrunScenario();
  const missing = withLibvirt ? await libvirtMissing() : 'not asked for (--no-libvirt)';
  const chosen = ways(bandwidthMiBs, timeoutS).filter((w) => w.method === 'vmferry' || !missing);
  console.log(`\n== RAM modes: a ${scenario.memoryMiB} MiB guest rewriting 64 MiB at 64 MiB/s, RAM and mirror capped at ${bandwidthMiBs} MiB/s ` +
    `(local ${scenario.localSizeMiB} MiB qcow2 with ${scenario.localFillMiB} MiB written, shared ${scenario.sharedSizeMiB} MiB; ${rounds} round(s))`);
  console.log(await machineLine());
  if (missing) console.log(`libvirt: not run, ${missing}`);
  const outcomes: Outcome[] = [];
  await withCleanup(async (cleanup) => {
    const libvirt = missing ? undefined : await startLibvirtHosts(cleanup);
    for (let round = 0; round < rounds; round++) {
      const order = chosen.map((_, i) => chosen[(i + round) % chosen.length] as Way);
      for (const way of order) {
        const outcome = await runWay(way, scenario, libvirt);
        const r = outcome.result;
        console.log(`  round ${round + 1} ${way.label}: ${r ? `total ${seconds(r.totalMs)} s, gap ${ms(r.ackGapMs)} ms, guest goes on: ${r.guestAlive ? 'yes' : 'NO'}` : `did not complete: ${outcome.failure ?? ''}`}`);
        outcomes.push(outcome);
      }
    }
  });
  const rows = chosen.map((way) => {
    const mine = outcomes.filter((o) => o.way === way.label);
    const done = mine.flatMap((o) => (o.result ? [o.result] : []));
    const med = (pick: (r: RunResult) => number | undefined): number => median(done.map((r) => pick(r) ?? Number.NaN).filter((x) => !Number.isNaN(x)));
    return [
      way.label,
      `${done.length}/${mine.length}`,
      done.length ? seconds(med((r) => r.totalMs)) : '-',
      ms(med((r) => (r.method === 'libvirt' ? undefined : r.pauseMs))),
      ms(med((r) => r.downtimeMs)),
      ms(med((r) => r.ackGapMs)),
      ms(med((r) => r.postcopyMs)),
      done.length ? String(Math.round(med((r) => r.ramBytes) / 2 ** 20)) : '-',
      done.length ? String(Math.round(med((r) => r.mirrorBytes) / 2 ** 20)) : '-',
      `${done.filter((r) => r.guestAlive).length}/${done.length}`,
    ];
  });
  console.log('Medians of completed runs. pause = STOP on A → RESUME on B (QMP timestamps; not visible in libvirt); downtime = QEMU\'s figure; ' +
    'gap = longest time between two acknowledged records of one disk, as the host received them; post-copy = B ran the guest while RAM still arrived');
  console.log(table(['way out', 'completed', 'total s', 'pause ms', 'downtime ms (QEMU)', 'gap ms', 'post-copy ms', 'RAM MiB', 'mirror MiB', 'guest goes on, no reboot'], rows));
  for (const o of outcomes.filter((x) => x.failure)) console.log(`  ${o.way}: ${o.failure ?? ''}`);
  return outcomes;
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string', default: '2' },
      bandwidth: { type: 'string', default: '16' },
      timeout: { type: 'string', default: '10' },
      'no-libvirt': { type: 'boolean', default: false },
    },
  });
  const outcomes = await ramModesBench(Number(values.rounds), Number(values.bandwidth), Number(values.timeout), !values['no-libvirt']);
  process.exitCode = outcomes.some((o) => o.result) ? 0 : 1;
}

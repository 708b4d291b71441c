/**
 * Migration: vmferry against the plain hand-written QMP sequence, on the same
 * VM (512 MiB RAM, a 2 GiB local qcow2 with 600 MiB written, a 4 GiB shared
 * volume), idle and with the guest writing to both disks, in one run. Methods
 * alternate within each round (and swap order between rounds) so the machine's
 * noise falls on both. What each column counts: bench/lib/migration-run.ts.
 *
 *   node --import tsx bench/migration.ts [--small] [--layout] [--scenario NAME] [--rounds 3] [--json out.json] [--no-libvirt] [--tls]
 *
 * libvirt 9.0 runs as a third method when it is installed (bench/lib/libvirt.ts says what it needs).
 * plain and libvirt start QEMU as their users do (pc, ordinary RAM, writeback cache): they are an
 * independent baseline, not vmferry's command line driven by hand.
 *
 * --small: 256 MiB RAM, 512 MiB local disk with 150 MiB written, 1 GiB shared, one round.
 *
 * --layout: issue 22's layout instead (layoutScenarios): 512 MiB RAM, a 1 GiB local qcow2 with
 * 270 MiB in 3 MiB stripes every 10 MiB above 128 MiB, a 4 GiB shared volume a quarter written the
 * same way, a guest acknowledging small fsynced records on each disk (~50/s) and dirtying 64 MiB of
 * RAM once a second; fragmented with 1 and 2 vCPUs, and contiguous. Two rounds. vmferry runs twice:
 * on its own defaults for a new VM (q35, cache=none) and on the user's VM as `vmferry vm import`
 * carries it over (vmferry-imported: the machine and cache mode plain and libvirt run).
 *
 * --tls: the cost of TLS instead: vmferry with and without its agents' TLS identities (RAM and mirror
 * over TLS between the QEMUs, a throwaway CA of `vmferry pki`), alternating the same way.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { aim, isMain, machineLine, median, mib, ratio, seconds, toMiB, withCleanup } from './lib/common.ts';
import { libvirtMissing, startLibvirtHosts } from './lib/libvirt.ts';
import { runOnce, type BenchTls } from './lib/migration-run.ts';
import type { Method, RunResult, Scenario } from './lib/run-types.ts';
import { initCa, issueCertificate } from '../src/security/pki.ts';
import { loadTlsIdentity, type TlsIdentity } from '../src/security/tls-files.ts';
import { writeQemuTlsDir } from '../src/qemu/tls-creds.ts';
import { makeTempDir } from '../test/support/temp.ts';

export interface MigrationBenchOptions {
  small: boolean;
  /** Issue 22's layout and its variations instead of the idle/writing pair. */
  layout?: boolean;
  rounds: number;
  /** Also run libvirt 9.0 where it can run here (see bench/lib/libvirt.ts). */
  libvirt: boolean;
  /** Compare vmferry with and without TLS between the QEMUs instead of vmferry with the other methods. */
  tls: boolean;
  /** Only the scenario of this name. */
  scenario?: string;
}

/** Host A's and B's agent identities from a throwaway CA (`vmferry pki issue agent A --address 127.0.0.1`), written for QEMU as an agent writes them, and the storage server's. */
async function clusterIdentities(dir: string): Promise<BenchTls> {
  await initCa(dir);
  const issue = async (id: string): Promise<string> => {
    const issued = await issueCertificate(dir, { role: 'agent', id, addresses: ['127.0.0.1'] });
    return writeQemuTlsDir(loadTlsIdentity({ pkiDir: issued.dir }, 'server') as TlsIdentity, join(dir, `qemu-${id}`));
  };
  const storage = await issueCertificate(dir, { role: 'storage', id: 'storage', addresses: ['127.0.0.1'] });
  return { A: await issue('A'), B: await issue('B'), storage: loadTlsIdentity({ pkiDir: storage.dir }, 'server') as TlsIdentity };
}

export function migrationScenarios(small: boolean): Scenario[] {
  const size = small
    ? { memoryMiB: 256, localSizeMiB: 512, localFillMiB: 150, sharedSizeMiB: 1024 }
    : { memoryMiB: 512, localSizeMiB: 2048, localFillMiB: 600, sharedSizeMiB: 4096 };
  return [
    // Idle: one durable 4 KiB record per disk per second, nothing else.
    { name: 'idle', ...size, guest: { mode: 'workload', spanMiB: 8, intervalMs: 1000 }, warmupAcks: 3 },
    // Writing: records as fast as fdatasync allows, 8 MiB/s of bulk writes on each disk, 64 MiB of RAM dirtied at 8 MiB/s.
    // The 8 s warm-up lets the guest touch its whole dirty area before the migration starts.
    {
      name: 'writing',
      ...size,
      guest: { mode: 'workload', spanMiB: 8, bulkMiBs: 8, bulkDisks: ['local0', 'shared0'], dirtyMiB: 64 },
      warmupAcks: 20,
      warmupMs: 8000,
    },
  ];
}

/**
 * Issue 22's layout: a guest vmferry's own benchmark never used. Fragmented
 * (3 MiB stripes every 10 MiB, as a file system leaves data) or contiguous
 * (the same bytes in one block), 1 or 2 vCPUs.
 */
export function layoutScenarios(): Scenario[] {
  const base = {
    memoryMiB: 512,
    localSizeMiB: 1024,
    localFillMiB: 270,
    sharedSizeMiB: 4096,
    sharedFillMiB: 1024,
    // A small durable record per disk every ~20 ms (15 ms apart plus the fsync), 64 MiB of RAM rewritten every second.
    guest: { mode: 'workload', spanMiB: 8, intervalMs: 15, dirtyMiB: 64, dirtyRateMiBs: 64 },
    warmupAcks: 20,
    warmupMs: 4000,
  } as const;
  const stripes = { fromMiB: 128, sizeMiB: 3, everyMiB: 10 };
  return [
    { name: 'layout', ...base, stripes },
    { name: 'layout-contiguous', ...base },
    { name: 'layout-2vcpu', ...base, stripes, vcpus: 2 },
  ];
}

function rowOf(r: RunResult): (string | number)[] {
  const wire = r.ramBytes + r.mirrorBytes;
  const floor = r.localAllocatedBytes + r.ramInUseBytes;
  return [
    r.scenario,
    r.method,
    seconds(r.totalMs),
    Math.round(r.downtimeMs),
    Number.isNaN(r.pauseMs) ? '-' : Math.round(r.pauseMs),
    toMiB(r.ramBytes),
    toMiB(r.mirrorBytes),
    toMiB(wire),
    `${toMiB(r.localAllocatedBytes)} + ${toMiB(r.ramInUseBytes)}`,
    ratio(wire, floor),
    Number.isNaN(r.sharedBytes) ? '- (vda only)' : r.sharedBytes,
    r.guestAlive ? 'yes' : 'NO',
  ];
}

const ms = (value: number | undefined): string | number => (value === undefined || Number.isNaN(value) ? '-' : Math.round(value));

/** The figures issue 22 asks for, per run: the guest's view (pause, gap between acks) and every attempt. */
function guestRowOf(r: RunResult): (string | number)[] {
  return [
    r.scenario,
    r.method,
    seconds(r.totalMs),
    ms(r.pauseMs),
    ms(r.compareMs),
    r.attempts > 1 ? `${ms(r.pausesMs)} (${r.attempts})` : r.attempts,
    ms(r.ackGapMs),
    `${ms(r.ackBeforeMs)} / ${ms(r.ackMirroringMs)}`,
    toMiB(r.ramBytes),
    r.passes ?? '-',
    r.guestAlive ? 'yes' : 'NO',
  ];
}

export async function migrationBench(options: MigrationBenchOptions): Promise<RunResult[]> {
  const results: RunResult[] = [];
  const refused: string[] = [];
  const scenarios = (options.layout ? layoutScenarios() : migrationScenarios(options.small)).filter((s) => !options.scenario || s.name === options.scenario);
  if (scenarios.length === 0) throw new Error(`no scenario named ${options.scenario}`);
  const missing = options.tls ? 'not part of the TLS comparison' : options.libvirt ? await libvirtMissing() : 'not asked for (--no-libvirt)';
  const vmferryMethods: Method[] = options.layout ? ['vmferry', 'vmferry-imported'] : ['vmferry'];
  const methods: Method[] = options.tls ? ['vmferry', 'vmferry-tls'] : missing ? [...vmferryMethods, 'plain'] : [...vmferryMethods, 'plain', 'libvirt'];
  const first = scenarios[0] as Scenario;
  console.log(`\n== Migration: ${options.tls ? 'vmferry with and without TLS between the QEMUs' : 'vmferry vs plain QMP'} (${options.small ? 'small' : 'full'} sizes: ${first.memoryMiB} MiB RAM, ` +
    `local ${first.localSizeMiB} MiB qcow2 with ${first.localFillMiB} MiB written, shared ${first.sharedSizeMiB} MiB; ${options.rounds} round(s))`);
  console.log(await machineLine());
  if (missing) console.log(`libvirt: not run, ${missing}`);
  await withCleanup(async (cleanup) => {
    const libvirt = missing ? undefined : await startLibvirtHosts(cleanup);
    let tls: BenchTls | undefined;
    if (options.tls) {
      const pki = await makeTempDir('bench-pki');
      cleanup.add('remove the throwaway CA', () => pki.remove());
      tls = await clusterIdentities(join(pki.path, 'pki'));
    }
    for (let round = 0; round < options.rounds; round++) {
      for (const scenario of scenarios) {
        // Each round rotates the order, so no method always runs first (or right after the same one).
        const order = methods.map((_, i) => methods[(i + round) % methods.length] as Method);
        for (const method of order) {
          const started = Date.now();
          let result: RunResult;
          try {
            result = await runOnce(method, scenario, { libvirt, tls });
          } catch (err) {
            // vmferry's memory comparison (TCG) refusing a corrupt destination, every retry included, is an outcome to count, not a crash of the benchmark.
            if (!method.startsWith('vmferry') || !/memory on B differs/.test(String(err))) throw err;
            refused.push(`round ${round + 1} ${scenario.name}: ${String(err).replace(/^Error: vmferry migration failed: /, '').slice(0, 90)}…`);
            console.log(`  round ${round + 1} ${scenario.name} ${method}: rolled back, the destination's memory differed (QEMU TCG defect)`);
            continue;
          }
          results.push(result);
          console.log(`  round ${round + 1} ${scenario.name} ${method}: total ${seconds(result.totalMs)} s, downtime ${Math.round(result.downtimeMs)} ms, ` +
            `gap ${ms(result.ackGapMs)} ms, attempts ${result.attempts} (run with setup ${((Date.now() - started) / 1000).toFixed(0)} s)`);
          for (const refusal of result.refusals ?? []) refused.push(`round ${round + 1} ${scenario.name}, retried: ${refusal.slice(0, 90)}…`);
        }
      }
    }
  });
  console.log(table(
    ['scenario', 'method', 'total s', 'downtime ms (QEMU)', 'pause ms (STOP→RESUME)', 'RAM MiB', 'mirror MiB', 'wire MiB', 'floor MiB (local + RAM)', 'wire ÷ floor', 'shared B', 'guest goes on'],
    results.map(rowOf),
  ));

  console.log('What the guest saw: pause = STOP on A → RESUME on B (QMP timestamps; libvirt: its own downtime figure); ' +
    'gap = longest time between two acknowledged records of one disk around the migration, as the host received them; ' +
    'ack pace = median time between records before the migration / while mirroring; RAM = every attempt\'s');
  console.log(table(
    ['scenario', 'method', 'total s', 'pause ms', 'of it comparing memory ms', 'attempts (pauses ms)', 'gap ms', 'ack pace ms before / mirroring', 'RAM MiB', 'passes', 'guest goes on'],
    results.map((r) => (r.method === 'libvirt' ? [...guestRowOf(r).slice(0, 3), ms(r.downtimeMs), ...guestRowOf(r).slice(4)] : guestRowOf(r))),
  ));

  // Where the time goes: each phase from its start mark to the next (medians over rounds).
  const phases = ['planned', 'preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'completed'];
  const phaseRows: (string | number)[][] = [];
  for (const scenario of scenarios) {
    for (const method of methods.filter((m) => m !== 'libvirt')) {
      const runs = results.filter((r) => r.scenario === scenario.name && r.method === method);
      const at = (r: RunResult, label: string): number | undefined => r.marks.find((m) => m.label === label)?.t;
      const cells = phases.slice(0, -1).map((label, i) => {
        const spans = runs.flatMap((r) => {
          const start = label === 'planned' ? 0 : at(r, label);
          const end = label === 'planned' ? at(r, 'planned') : at(r, phases[i + 1] as string);
          return start !== undefined && end !== undefined ? [end - start] : [];
        });
        return spans.length ? seconds(median(spans)) : '-';
      });
      phaseRows.push([scenario.name, method, ...cells, seconds(median(runs.map((r) => r.totalMs)))]);
    }
  }
  console.log('Phases, seconds (medians): probe+plan is vmferry only; switching-over runs to the source QEMU\'s exit');
  console.log(table(['scenario', 'method', 'probe+plan', 'preparing B', 'mirroring', 'RAM pre-copy', 'paused-at-switchover', 'total'], phaseRows));

  const lines = options.tls ? tlsLines(scenarios, results) : options.layout ? ratioLines(scenarios, results) : aimLines(scenarios, results);
  if (refused.length) lines.push(`vmferry refused to resume a destination whose memory differed from the source's (rolled back, guest unharmed on A):\n  ${refused.join('\n  ')}`);
  lines.push(`guest went on at B without a reboot: ${methods.map((m) => `${m} ${results.filter((r) => r.method === m && r.guestAlive).length}/${results.filter((r) => r.method === m).length}`).join(', ')}`);
  console.log(lines.join('\n'));
  return results;
}

/** What TLS between the QEMUs costs, per scenario: medians with TLS over medians without, on the same VM and work. */
function tlsLines(scenarios: Scenario[], results: RunResult[]): string[] {
  const lines: string[] = [];
  for (const scenario of scenarios) {
    const of = (method: Method): RunResult[] => results.filter((r) => r.scenario === scenario.name && r.method === method);
    const [plain, tls] = [of('vmferry'), of('vmferry-tls')];
    const figure = (name: string, pick: (r: RunResult) => number, unit: (ms: number) => string): string => {
      const [without, withTls] = [median(plain.map(pick)), median(tls.map(pick))];
      return `${name} ${unit(withTls)} with TLS, ${unit(without)} without: ×${ratio(withTls, without)}`;
    };
    const s = (ms: number): string => `${seconds(ms)} s`;
    const ms = (value: number): string => `${Math.round(value)} ms`;
    lines.push(`${scenario.name} (medians of ${tls.length} with, ${plain.length} without):`);
    lines.push(`  ${figure('total', (r) => r.totalMs, s)}`);
    lines.push(`  ${figure('pause (STOP→RESUME)', (r) => r.pauseMs, ms)}`);
    lines.push(`  ${figure('downtime (QEMU)', (r) => r.downtimeMs, ms)}`);
    lines.push(`  ${figure('RAM pre-copy', (r) => phaseMs(r, 'migrating', 'paused-at-switchover'), s)}`);
    lines.push(`  ${figure('mirroring', (r) => phaseMs(r, 'mirroring', 'migrating'), s)}`);
  }
  return lines;
}

function phaseMs(r: RunResult, from: string, to: string): number {
  const at = (label: string): number | undefined => r.marks.find((m) => m.label === label)?.t;
  const [start, end] = [at(from), at(to)];
  return start === undefined || end === undefined ? Number.NaN : end - start;
}

/** Issue 22's figures, per scenario: medians of vmferry ÷ medians of plain and of libvirt, and its aims. */
function ratioLines(scenarios: Scenario[], results: RunResult[]): string[] {
  const lines: string[] = [];
  for (const scenario of scenarios) {
    const of = (method: Method): RunResult[] => results.filter((r) => r.scenario === scenario.name && r.method === method);
    const [p, l] = [of('plain'), of('libvirt')];
    const m = (runs: RunResult[], pick: (r: RunResult) => number | undefined): number => median(runs.map((r) => pick(r) ?? Number.NaN).filter((x) => !Number.isNaN(x)));
    lines.push(`${scenario.name} (medians; plain ${p.length}, libvirt ${l.length} runs):`);
    for (const method of ['vmferry', 'vmferry-imported'] as const) {
      const v = of(method);
      if (v.length === 0) continue;
      const figure = (name: string, pick: (r: RunResult) => number | undefined, unit: string, scale = 1): string => {
        const [vm, pm, lm] = [m(v, pick), m(p, pick), m(l, pick)];
        const fmt = (x: number): string => (Number.isNaN(x) ? '-' : (x / scale).toFixed(scale === 1 ? 0 : 2));
        return `${name}: ${method} ${fmt(vm)} ${unit}, plain ${fmt(pm)}, libvirt ${fmt(lm)}; ÷ plain ${ratio(vm, pm)}, ÷ libvirt ${ratio(vm, lm)}`;
      };
      lines.push(`  ${method} (${v.length} runs):`);
      lines.push(`    ${figure('total', (r) => r.totalMs, 's', 1000)}`);
      lines.push(`    ${figure('pause STOP→RESUME (libvirt: its downtime)', (r) => (r.method === 'libvirt' ? r.downtimeMs : r.pauseMs), 'ms')}`);
      lines.push(`    ${figure('gap between acks', (r) => r.ackGapMs, 'ms')}`);
      lines.push(`    ${figure('RAM bytes, every attempt', (r) => r.ramBytes / mib, 'MiB')}`);
      const attempts = v.reduce((sum, r) => sum + r.attempts, 0);
      lines.push(`    attempts: ${attempts} for ${v.length} migrations, ${attempts - v.length} refused for a memory mismatch`);
      const totalRatio = m(v, (r) => r.totalMs) / m(p, (r) => r.totalMs);
      lines.push(`    ${aim(totalRatio <= 1.1, `total ÷ plain ${totalRatio.toFixed(2)} ≤ 1.1`)}   ` +
        `${aim(m(v, (r) => r.pauseMs) <= m(p, (r) => r.pauseMs) + 100, 'pause ≤ plain\'s + 100 ms')}   ` +
        `${aim((attempts - v.length) * 10 < attempts, 'fewer than 1 in 10 attempts refused')}`);
    }
  }
  return lines;
}

/** The aims of issue 6 (vmferry against plain QMP and libvirt), per scenario. */
function aimLines(scenarios: Scenario[], results: RunResult[]): string[] {
  const lines: string[] = [];
  for (const scenario of scenarios) {
    const of = (method: Method): RunResult[] => results.filter((r) => r.scenario === scenario.name && r.method === method);
    const v = of('vmferry');
    const p = of('plain');
    const totalRatio = median(v.map((r) => r.totalMs)) / median(p.map((r) => r.totalMs));
    const downtime = Math.max(...v.map((r) => r.downtimeMs));
    const pause = Math.max(...v.map((r) => r.pauseMs));
    const wireRatio = Math.max(...v.map((r) => (r.ramBytes + r.mirrorBytes) / (r.localAllocatedBytes + r.ramInUseBytes)));
    const downtimeAim = scenario.name === 'idle' ? 100 : 300;
    lines.push(`${scenario.name}:`);
    lines.push(`  ${aim(totalRatio <= 1.05, `total time vmferry ÷ plain (medians) ${totalRatio.toFixed(2)} ≤ 1.05`)}`);
    lines.push(`  ${aim(downtime <= downtimeAim, `downtime (QEMU, worst) ${Math.round(downtime)} ms ≤ ${downtimeAim} ms`)}; guest-visible pause (worst) ${Math.round(pause)} ms`);
    lines.push(`  ${aim(wireRatio <= 1.1, `bytes on the wire ÷ floor (worst) ${wireRatio.toFixed(2)} ≤ 1.1`)}`);
    lines.push(`  ${aim(v.every((r) => r.sharedBytes === 0), 'shared bytes copied: 0')}`);
    const l = of('libvirt');
    if (l.length) {
      const libvirtRatio = median(v.map((r) => r.totalMs)) / median(l.map((r) => r.totalMs));
      lines.push(`  ${aim(libvirtRatio < 1, `total time vmferry ÷ libvirt (medians) ${libvirtRatio.toFixed(2)} < 1`)}`);
      lines.push(`  libvirt for reference: downtime ${l.map((r) => Math.round(r.downtimeMs)).join(', ')} ms; wire ÷ floor by QEMU's counters ` +
        `${l.map((r) => ratio(r.ramBytes + r.mirrorBytes, r.localAllocatedBytes + r.ramInUseBytes)).join(', ')}; ` +
        `bytes the bridge sent to B ÷ floor ${l.map((r) => ratio(r.bridgeToDestinationBytes ?? Number.NaN, r.localAllocatedBytes + r.ramInUseBytes)).join(', ')}`);
    }
    lines.push(`  plain QMP for reference: downtime ${p.map((r) => Math.round(r.downtimeMs)).join(', ')} ms; wire ÷ floor ` +
      `${p.map((r) => ratio(r.ramBytes + r.mirrorBytes, r.localAllocatedBytes + r.ramInUseBytes)).join(', ')}`);
  }
  return lines;
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({
    options: {
      small: { type: 'boolean', default: false },
      rounds: { type: 'string' },
      json: { type: 'string' },
      'no-libvirt': { type: 'boolean', default: false },
      tls: { type: 'boolean', default: false },
      layout: { type: 'boolean', default: false },
      scenario: { type: 'string' },
    },
  });
  const small = values.small ?? false;
  const layout = values.layout ?? false;
  const results = await migrationBench({ small, layout, rounds: Number(values.rounds ?? (small ? 1 : layout ? 2 : 3)), libvirt: !values['no-libvirt'], tls: values.tls ?? false, ...(values.scenario ? { scenario: values.scenario } : {}) });
  if (values.json) await writeFile(values.json, JSON.stringify(results, null, 1));
}

/**
 * One hybrid live migration, measured, by one of three methods:
 *
 *   vmferry  the planner and executor (src/migration), as the agents run them;
 *   plain    a hand-written QMP sequence (plain-qmp.ts) with no vmferry code in
 *            the migration's path;
 *   libvirt  virsh migrate between two libvirtd (libvirt.ts, which says how it
 *            measures: libvirt has its own VM definition and job statistics).
 *
 * vmferry and plain get the same setup, made with vmferry's helpers: a local qcow2 in host
 * A's pool with data written into it, a shared volume on an in-process vmferry
 * storage server, the test guest booted on both disks. vmferry starts QEMU from
 * its own command line; plain from a user's (plain-command-line.ts: pc, ordinary
 * RAM, writeback cache). Host A and host B are two directories; everything is on loopback.
 *
 * What is measured, the same way for vmferry and plain:
 *   total     wall time from the first step of the method (vmferry: probing both
 *             hosts and planning, as the controller does it: both probes at once,
 *             QEMU's capabilities cached as the agent caches them; plain: creating
 *             the target image) until the guest runs on B and A's QEMU has exited
 *   downtime  QEMU's own figure (query-migrate "downtime" on A), and the pause
 *             the guest saw: QEMU's timestamp of A's STOP event to that of
 *             B's RESUME event (includes B's export teardown and cont)
 *   wire      RAM bytes QEMU put on the migration stream ("ram.transferred",
 *             page headers included) + the bytes each mirror job copied (its
 *             progress counter at completion, re-copies of dirtied blocks included)
 *   floor     allocated bytes of the local image when the guest stopped (A's
 *             image, kept for the measurement) + guest RAM in use on B right
 *             after the migration (pages not all zero in a pmemsave dump: what
 *             must have arrived; a dump on A just before is reported too)
 *   shared    bytes of any block job on a shared disk (sampled every 100 ms)
 */
import { mkdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { reportLogOf, testGuestSpec, waitForAcks } from '../../src/guest/test-guest.ts';
import { runAttempts } from '../../src/controller/attempts.ts';
import { runMigration } from '../../src/migration/executor.ts';
import type { MigrationPhase } from '../../src/migration/phases.ts';
import { defaultMigrationOptions, planMigration, withRamMode, type MigrationOptions } from '../../src/migration/plan.ts';
import { probeDestination, probeSource, qemuCapabilities, type QemuCapabilities } from '../../src/migration/probe.ts';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { QemuSource } from '../../src/migration/qemu-source.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import { qemuPeerName } from '../../src/qemu/tls-creds.ts';
import type { TlsIdentity } from '../../src/security/tls-files.ts';
import type { DiskSpec } from '../../src/qemu/spec.ts';
import { imageInfo, LocalPool } from '../../src/storage/local-pool.ts';
import type { Cleanup } from '../../test/support/cleanup.ts';
import { startTestStorage } from '../../test/support/storage.ts';
import { makeTempDir } from '../../test/support/temp.ts';
import { ackGaps, watchAcks, type AckWatch } from './ack-watch.ts';
import { guestRamInUse, hostSync, mib, withCleanup } from './common.ts';
import { fillImage, volumeFile } from './layout.ts';
import { runLibvirtOnce, type LibvirtHosts } from './libvirt.ts';
import { userKnobs, type PlainKnobs } from './plain-command-line.ts';
import { plainMigration, spawnPlainQemu } from './plain-qmp.ts';
import type { Host, Method, RunResult, Sample, Scenario } from './run-types.ts';

export interface RunOptions {
  /** vmferry only: options over the defaults (keepSource is always on, to measure A's image). */
  vmferry?: Partial<MigrationOptions>;
  /** vmferry only: the executor's progress polling interval (its default: 250 ms). */
  vmferryPollMs?: number;
  /** vmferry only: overrides of its VM spec (machine type, disks' cache mode). */
  vmferrySpec?: { machine?: string; cache?: 'none' | 'writeback' };
  /** plain only: which of vmferry's choices it makes (default: none, a user's QEMU). */
  plain?: PlainKnobs;
  /** Label of the settings, for tables (bench/variants.ts). */
  variant?: string;
  /** How often A's block jobs are sampled for the shared-bytes check; 0: not at all. Default 500 ms. */
  sampleMs?: number;
  /** libvirt only: the two daemons, started once per benchmark. */
  libvirt?: LibvirtHosts;
  /** libvirt only: flags for `virsh migrate` beyond the hybrid-storage ones (bench/ram-modes.ts). */
  libvirtMigrateFlags?: string[];
  /** vmferry-tls only: host A's and B's agent identities in QEMU's layout, and the storage server's, made once per benchmark. */
  tls?: BenchTls;
}

/** A TLS cluster's identities: its QEMUs open shared disks under TLS, so its storage server takes TLS only. */
export interface BenchTls {
  A: string;
  B: string;
  storage: TlsIdentity;
}

const localId = 'local0';
const sharedId = 'shared0';
/** How long after its acks the guest must stay up on B (a crash after a corrupt resume takes a moment). */
const rebootWatchMs = 5_000;


/** Polls the source's block jobs and migration status until stopped (or the source is gone). */
function startSampler(execute: (command: string) => Promise<unknown>, t0: number, intervalMs: number): { stop(): Promise<Sample[]> } {
  const samples: Sample[] = [];
  if (intervalMs <= 0) return { stop: () => Promise.resolve(samples) };
  let stopped = false;
  const loop = (async () => {
    // Bounded: 30 minutes of samples at most.
    for (let i = 0; i < (30 * 60_000) / intervalMs && !stopped; i++) {
      try {
        const [jobs, info] = (await Promise.all([execute('query-block-jobs'), execute('query-migrate')])) as [
          { device: string; offset: number; len: number; ready: boolean }[],
          { status?: string; ram?: { remaining: number; transferred: number; total: number } },
        ];
        samples.push({
          t: performance.now() - t0,
          jobs: jobs.map((j) => ({ device: j.device, offset: j.offset, len: j.len, ready: j.ready })),
          ram: info.ram ? { status: info.status ?? '', remaining: info.ram.remaining, transferred: info.ram.transferred, total: info.ram.total } : undefined,
        });
      } catch {
        return; // the source QEMU quit: the migration is over
      }
      await sleep(intervalMs);
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
      return samples;
    },
  };
}

async function prepareHost(scenario: Scenario, cleanup: Cleanup, storageTls?: TlsIdentity): Promise<Host> {
  const temp = await makeTempDir(`bench-${scenario.name}`);
  cleanup.add('remove temp dir', () => temp.remove());
  const dir = temp.path;
  for (const sub of ['poolA', 'poolB', 'runA', 'runB', 'logs']) mkdirSync(join(dir, sub));
  const poolA = new LocalPool(join(dir, 'poolA'));
  const localPath = await poolA.create(`${scenario.name}-${localId}.qcow2`, 'qcow2', scenario.localSizeMiB * mib);
  await fillImage(localPath, 'qcow2', scenario, scenario.localFillMiB);
  const storage = await startTestStorage(storageTls ? { tls: storageTls } : {});
  cleanup.add('stop the storage server', () => storage.stop());
  await storage.server.volumes.create(sharedId, scenario.sharedSizeMiB * mib, false);
  // Straight into the volume's file: nothing has it open yet.
  await fillImage(volumeFile(storage.dataDir, sharedId), 'raw', scenario, scenario.sharedFillMiB ?? 0);
  const disks: DiskSpec[] = [
    { id: localId, source: { kind: 'file', path: localPath, format: 'qcow2' } },
    { id: sharedId, source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, export: sharedId } },
  ];
  const spec = { ...testGuestSpec(scenario.name, disks, join(dir, 'logs'), scenario.guest, scenario.memoryMiB), vcpus: scenario.vcpus ?? 1 };
  return { dir, spec, localPath, poolB: join(dir, 'poolB'), runB: join(dir, 'runB'), cleanup };
}

/** Least time acks are watched before the migration starts: the guest's normal pace. */
const paceWindowMs = 2000;

/** Waits until the guest's workload is in full swing; from its first acks on, they are timed (the returned watch). */
async function warmUp(host: Host, scenario: Scenario): Promise<AckWatch> {
  const booted = Date.now();
  await waitForAcks([reportLogOf(host.spec)], [localId, sharedId], { atLeast: scenario.warmupAcks, timeoutMs: 180_000 });
  const watch = watchAcks([reportLogOf(host.spec)]);
  host.cleanup.add('stop timing acks', () => watch.stop().then(() => undefined));
  const left = Math.max((scenario.warmupMs ?? 0) - (Date.now() - booted), paceWindowMs);
  await sleep(left);
  return watch;
}

/** The ack figures of a run whose migration started at t0 (performance.now()) with `marks` relative to it. */
function gapFigures(acks: Awaited<ReturnType<AckWatch['stop']>>, t0: number, totalMs: number, marks: { label: string; t: number }[]): Pick<RunResult, 'ackGapMs' | 'ackBeforeMs' | 'ackMirroringMs'> {
  const at = (label: string): number => t0 + (marks.findLast((m) => m.label === label)?.t ?? Number.NaN);
  const gaps = ackGaps(acks, t0, t0 + totalMs, at('mirroring'), at('migrating'));
  return { ackGapMs: gaps.maxGapMs, ackBeforeMs: gaps.beforeMs, ackMirroringMs: gaps.mirroringMs };
}

/** The guest keeps acknowledging records on B: the migration delivered a live guest. */
/**
 * The guest acknowledges new records on B and has not rebooted there: a guest
 * resumed on corrupt memory (docs/QEMU-TCG-PRECOPY.md) crashes and announces
 * READY again, and a few acks of its new life must not count.
 */
async function guestGoesOn(host: Host): Promise<boolean> {
  const destinationLog = host.destinationReportLog;
  if (!destinationLog) return false;
  const logs = [reportLogOf(host.spec), destinationLog];
  const before = (await waitForAcks(logs, [localId, sharedId], { atLeast: 0, timeoutMs: 1000 })).acks;
  const acked = await waitForAcks(logs, [localId, sharedId], { atLeast: 2, since: before, timeoutMs: 60_000 }).then(
    () => true,
    () => false,
  );
  await sleep(rebootWatchMs);
  return acked && !(await readFile(destinationLog, 'utf8')).includes('READY');
}

function summarize(
  method: Method,
  scenario: Scenario,
  figures: Omit<RunResult, 'method' | 'scenario' | 'sharedBytes' | 'samples' | 'guestAlive'>,
  samples: Sample[],
  guestAlive: boolean,
): RunResult {
  // Bytes of any block job on a shared disk: there should never be one.
  const sharedJobs = new Map<string, number>();
  for (const sample of samples) {
    for (const job of sample.jobs) if (job.device !== `mirror-${localId}`) sharedJobs.set(job.device, job.offset);
  }
  const sharedBytes = [...sharedJobs.values()].reduce((a, b) => a + b, 0);
  return { method, scenario: scenario.name, ...figures, sharedBytes, samples, guestAlive };
}

let capabilities: Promise<QemuCapabilities> | undefined;

/** QEMU's version and machine types, read once per benchmark process like an agent does (src/agent/migration-sides.ts). */
export function cachedCapabilities(): Promise<QemuCapabilities> {
  capabilities ??= qemuCapabilities();
  return capabilities;
}

async function runVmferry(method: Method, host: Host, scenario: Scenario, options: RunOptions, tls?: BenchTls): Promise<RunResult> {
  await cachedCapabilities();
  if (options.vmferrySpec?.machine) host.spec.machine = options.vmferrySpec.machine;
  const cache = options.vmferrySpec?.cache;
  if (cache) host.spec.disks = host.spec.disks.map((d) => ({ ...d, cache }));
  const source = await QemuProcess.start(host.spec, { runDir: join(host.dir, 'runA', scenario.name), ...(tls ? { tlsDir: tls.A } : {}) });
  host.cleanup.add('stop source QEMU', () => source.kill());
  const acks = await warmUp(host, scenario);
  const ramInUseBeforeBytes = await guestRamInUse((command, args) => source.monitor.client.execute(command, args), scenario.memoryMiB);
  await hostSync();

  const poolB = new LocalPool(host.poolB);
  // With TLS as an agent of `vmferry pki` has it: the destination lets in only A's certificate.
  const destinationTls = tls ? { tlsDir: tls.B, agentPeerName: (id: string) => qemuPeerName('agent', id) } : {};
  let destination: QemuDestination | undefined;
  host.cleanup.add('stop destination QEMU', () => destination?.vm?.kill());
  const marks: { label: string; t: number }[] = [];
  const t0 = performance.now();
  const sampler = startSampler((command) => source.monitor.client.execute(command), t0, options.sampleMs ?? 500);
  try {
    // As in production: the agent caches QEMU's capabilities, the controller probes both hosts at once.
    const qemu = await cachedCapabilities();
    const [sourceFacts, destinationFacts] = await Promise.all([probeSource('A', source, qemu), probeDestination('B', '127.0.0.1', host.spec, poolB, [], qemu, tls?.B)]);
    const plan = planMigration(host.spec, sourceFacts, destinationFacts, { ...defaultMigrationOptions, ...options.vmferry, keepSource: true });
    marks.push({ label: 'planned', t: performance.now() - t0 });
    // As the controller runs a migration: a memory mismatch is rolled back and tried again (src/controller/attempts.ts).
    const report = await runAttempts({
      run: (onEvent, ramMode) => {
        const side = new QemuDestination({ hostId: 'B', pool: poolB, vmDir: (vm) => join(host.runB, vm), address: '127.0.0.1', ...destinationTls });
        destination = side;
        return runMigration({
          spec: host.spec,
          plan: withRamMode(plan, ramMode),
          source: new QemuSource({ hostId: 'A', vm: source, tls: tls !== undefined }),
          destination: side,
          ...(options.vmferryPollMs ? { pollIntervalMs: options.vmferryPollMs } : {}),
          onEvent: (event) => {
            onEvent(event);
            if (event.type !== 'phase') return;
            marks.push({ label: event.phase, t: performance.now() - t0 });
            // The destination QEMU exists once "preparing" is over: its report log from here on.
            const vm = side.vm;
            if (event.phase === 'mirroring' && vm) acks.add(reportLogOf(vm.spec));
          },
        });
      },
      ramMode: plan.ram.mode,
      fallback: plan.options.fallback,
      beforeRetry: () => Promise.resolve(),
      onEvent: () => undefined,
      signal: new AbortController().signal,
    });
    const totalMs = performance.now() - t0;
    const samples = await sampler.stop();
    const attempts = report.attempts ?? 1;
    const refusals = (report.attemptLog ?? []).slice(0, -1).map((a) => a.error?.message.slice(0, 120) ?? a.outcome);
    if (report.outcome !== 'completed') {
      throw new Error(`vmferry migration ${report.outcome} after ${attempts} attempt(s): ${report.error?.message ?? ''}`);
    }
    const destinationVm = destination?.vm;
    if (!destinationVm) throw new Error('no destination QEMU after a completed migration');
    host.destinationReportLog = reportLogOf(destinationVm.spec);
    const guestAlive = await guestGoesOn(host);
    const gaps = gapFigures(await acks.stop(), t0, totalMs, marks);
    // Only now: the dump holds B's main loop, and the guest's I/O with it, for ~0.4 s (it was inside the gap).
    const ramInUseBytes = await guestRamInUse((command, args) => destinationVm.monitor.client.execute(command, args), scenario.memoryMiB);
    return summarize(
      method,
      scenario,
      {
        totalMs,
        downtimeMs: report.downtimeMs ?? Number.NaN,
        // QEMU's STOP (A) and RESUME (B) event timestamps, as vmferry reads them for its report.
        pauseMs: report.pauseMs ?? Number.NaN,
        pausesMs: report.allAttempts?.pauseMs ?? report.pauseMs ?? Number.NaN,
        // Every attempt's RAM went over the wire.
        ramBytes: report.allAttempts?.ramBytes ?? report.ram.transferredBytes,
        mirrorBytes: report.disks.filter((d) => d.operation === 'mirror').reduce((sum, d) => sum + d.bytesSent, 0),
        localAllocatedBytes: (await imageInfo(host.localPath, 'qcow2')).allocatedBytes,
        ramInUseBytes,
        ramInUseBeforeBytes,
        marks,
        attempts,
        refusals,
        passes: report.ram.passes,
        ...(report.ram.compareMs === undefined ? {} : { compareMs: report.ram.compareMs }),
        ...(report.ram.postcopyMs === undefined ? {} : { postcopyMs: report.ram.postcopyMs }),
        ...(options.variant ? { variant: options.variant } : {}),
        ...gaps,
      },
      samples,
      guestAlive,
    );
  } finally {
    await sampler.stop();
    await acks.stop();
  }
}

async function runPlain(host: Host, scenario: Scenario, options: RunOptions): Promise<RunResult> {
  const knobs = options.plain ?? userKnobs;
  const source = await spawnPlainQemu(host.spec, knobs, 'run', join(host.dir, 'runA', scenario.name));
  host.cleanup.add('stop source QEMU', () => source.kill());
  const acks = await warmUp(host, scenario);
  const ramInUseBeforeBytes = await guestRamInUse((command, args) => source.qmp.execute(command, args), scenario.memoryMiB);
  await hostSync();
  const t0 = performance.now();
  const sampler = startSampler((command) => source.qmp.execute(command), t0, options.sampleMs ?? 500);
  try {
    const { destination, ...result } = await plainMigration(host, source, localId, t0, knobs, (log) => acks.add(log));
    const samples = await sampler.stop();
    const guestAlive = await guestGoesOn(host);
    const gaps = gapFigures(await acks.stop(), t0, result.totalMs, result.marks);
    const ramInUseBytes = await guestRamInUse((command, args) => destination.qmp.execute(command, args), scenario.memoryMiB);
    return summarize(
      'plain',
      scenario,
      {
        ...result,
        localAllocatedBytes: (await imageInfo(host.localPath, 'qcow2')).allocatedBytes,
        ramInUseBytes,
        ramInUseBeforeBytes,
        attempts: 1,
        pausesMs: result.pauseMs,
        ...(options.variant ? { variant: options.variant } : {}),
        ...gaps,
      },
      samples,
      guestAlive,
    );
  } finally {
    await sampler.stop();
    await acks.stop();
  }
}

/** Sets up host A and B from scratch, runs one migration by `method`, tears everything down. */
export function runOnce(method: Method, scenario: Scenario, options: RunOptions = {}): Promise<RunResult> {
  return withCleanup(async (cleanup) => {
    if (method === 'libvirt') {
      if (!options.libvirt) throw new Error('libvirt runs need the libvirt hosts');
      return runLibvirtOnce(options.libvirt, scenario, cleanup, options.libvirtMigrateFlags);
    }
    const host = await prepareHost(scenario, cleanup, method === 'vmferry-tls' ? options.tls?.storage : undefined);
    // Host write-back of fresh images would compete with the mirror.
    await hostSync();
    if (method === 'plain') return await runPlain(host, scenario, options);
    if (method === 'vmferry') return await runVmferry(method, host, scenario, options);
    if (method === 'vmferry-imported') return await runVmferry(method, host, scenario, { ...options, vmferrySpec: { machine: userKnobs.machine, cache: userKnobs.cache, ...options.vmferrySpec } });
    if (!options.tls) throw new Error('vmferry-tls runs need the agents\' TLS identities');
    return await runVmferry(method, host, scenario, options, options.tls);
  });
}

export type { MigrationPhase };

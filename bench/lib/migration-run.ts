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
 * storage server, the test guest booted on both disks from the same command
 * line. Host A and host B are two directories; everything is on loopback.
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
import { runMigration } from '../../src/migration/executor.ts';
import type { MigrationEvent, MigrationPhase } from '../../src/migration/phases.ts';
import { defaultMigrationOptions, planMigration, type MigrationOptions } from '../../src/migration/plan.ts';
import { probeDestination, probeSource, qemuCapabilities, type QemuCapabilities } from '../../src/migration/probe.ts';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { QemuSource } from '../../src/migration/qemu-source.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import { qemuPeerName } from '../../src/qemu/tls-creds.ts';
import type { TlsIdentity } from '../../src/security/tls-files.ts';
import type { DiskSpec } from '../../src/qemu/spec.ts';
import type { QmpEventListener } from '../../src/qmp/client.ts';
import { imageInfo, LocalPool } from '../../src/storage/local-pool.ts';
import type { Cleanup } from '../../test/support/cleanup.ts';
import { startTestStorage } from '../../test/support/storage.ts';
import { makeTempDir } from '../../test/support/temp.ts';
import { execFile, guestRamInUse, hostSync, mib, withCleanup } from './common.ts';
import { runLibvirtOnce, type LibvirtHosts } from './libvirt.ts';
import { plainMigration, spawnPlainQemu } from './plain-qmp.ts';
import type { Host, Method, RunResult, Sample, Scenario } from './run-types.ts';

export interface RunOptions {
  /** vmferry only: options over the defaults (keepSource is always on, to measure A's image). */
  vmferry?: Partial<MigrationOptions>;
  sampleMs?: number;
  /** libvirt only: the two daemons, started once per benchmark. */
  libvirt?: LibvirtHosts;
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
  if (scenario.localFillMiB > 0) {
    // Right after the record area, where the guest's bulk writes land too: they overwrite data, not grow it.
    // qemu-io writes at most 2 GiB per request: 1 GiB pieces.
    const commands: string[] = [];
    for (let done = 0; done < scenario.localFillMiB; done += 1024) {
      commands.push('-c', `write -P 0x6b ${(scenario.guest.spanMiB ?? 64) + done}M ${Math.min(1024, scenario.localFillMiB - done)}M`);
    }
    await execFile('qemu-io', ['-f', 'qcow2', ...commands, localPath], { timeout: 600_000 });
  }
  const storage = await startTestStorage(storageTls ? { tls: storageTls } : {});
  cleanup.add('stop the storage server', () => storage.stop());
  await storage.server.volumes.create(sharedId, scenario.sharedSizeMiB * mib, false);
  const disks: DiskSpec[] = [
    { id: localId, source: { kind: 'file', path: localPath, format: 'qcow2' } },
    { id: sharedId, source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, export: sharedId } },
  ];
  const spec = testGuestSpec(scenario.name, disks, join(dir, 'logs'), scenario.guest, scenario.memoryMiB);
  return { dir, spec, localPath, poolB: join(dir, 'poolB'), runB: join(dir, 'runB'), cleanup };
}

async function warmUp(host: Host, scenario: Scenario): Promise<void> {
  const booted = Date.now();
  await waitForAcks([reportLogOf(host.spec)], [localId, sharedId], { atLeast: scenario.warmupAcks, timeoutMs: 180_000 });
  const left = (scenario.warmupMs ?? 0) - (Date.now() - booted);
  if (left > 0) await sleep(left);
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

async function runVmferry(host: Host, scenario: Scenario, options: RunOptions, tls?: BenchTls): Promise<RunResult> {
  await cachedCapabilities();
  const source = await QemuProcess.start(host.spec, { runDir: join(host.dir, 'runA', scenario.name), ...(tls ? { tlsDir: tls.A } : {}) });
  host.cleanup.add('stop source QEMU', () => source.kill());
  await warmUp(host, scenario);
  const ramInUseBeforeBytes = await guestRamInUse((command, args) => source.monitor.client.execute(command, args), scenario.memoryMiB);
  await hostSync();

  const poolB = new LocalPool(host.poolB);
  // With TLS as an agent of `vmferry pki` has it: the destination lets in only A's certificate.
  const destinationTls = tls ? { tlsDir: tls.B, agentPeerName: (id: string) => qemuPeerName('agent', id) } : {};
  const destination = new QemuDestination({ hostId: 'B', pool: poolB, vmDir: (vm) => join(host.runB, vm), address: '127.0.0.1', ...destinationTls });
  host.cleanup.add('stop destination QEMU', () => destination.vm?.kill());
  const sourceEvents = source.monitor.client.listen();
  let destinationEvents: QmpEventListener | undefined;
  const marks: { label: string; t: number }[] = [];
  const t0 = performance.now();
  const sampler = startSampler((command) => source.monitor.client.execute(command), t0, options.sampleMs ?? 100);
  let samples: Sample[] = [];
  try {
    // As in production: the agent caches QEMU's capabilities, the controller probes both hosts at once.
    const qemu = await cachedCapabilities();
    const [sourceFacts, destinationFacts] = await Promise.all([probeSource('A', source, qemu), probeDestination('B', '127.0.0.1', host.spec, poolB, [], qemu, tls?.B)]);
    const plan = planMigration(host.spec, sourceFacts, destinationFacts, { ...defaultMigrationOptions, ...options.vmferry, keepSource: true });
    marks.push({ label: 'planned', t: performance.now() - t0 });
    const onEvent = (event: MigrationEvent): void => {
      if (event.type !== 'phase') return;
      marks.push({ label: event.phase, t: performance.now() - t0 });
      // The destination QEMU exists once "preparing" is over: listen for its RESUME from here on.
      if (event.phase === 'mirroring' && !destinationEvents) destinationEvents = destination.vm?.monitor.client.listen();
    };
    const report = await runMigration({ spec: host.spec, plan, source: new QemuSource({ hostId: 'A', vm: source, tls: tls !== undefined }), destination, onEvent });
    const totalMs = performance.now() - t0;
    samples = await sampler.stop();
    if (report.outcome !== 'completed') throw new Error(`vmferry migration ${report.outcome}: ${report.error?.message ?? ''}`);
    const stop = await sourceEvents.waitFor('STOP', undefined, { timeoutMs: 1000 });
    const resume = await (destinationEvents?.waitFor('RESUME', undefined, { timeoutMs: 5000 }) ?? Promise.reject(new Error('no destination events')));
    const destinationVm = destination.vm;
    if (!destinationVm) throw new Error('no destination QEMU after a completed migration');
    const ramInUseBytes = await guestRamInUse((command, args) => destinationVm.monitor.client.execute(command, args), scenario.memoryMiB);
    host.destinationReportLog = reportLogOf(destinationVm.spec);
    const guestAlive = await guestGoesOn(host);
    return summarize(
      tls ? 'vmferry-tls' : 'vmferry',
      scenario,
      {
        totalMs,
        downtimeMs: report.downtimeMs ?? Number.NaN,
        pauseMs: (resume.timestampUs - stop.timestampUs) / 1000,
        ramBytes: report.ram.transferredBytes,
        mirrorBytes: report.disks.filter((d) => d.operation === 'mirror').reduce((sum, d) => sum + d.bytesSent, 0),
        localAllocatedBytes: (await imageInfo(host.localPath, 'qcow2')).allocatedBytes,
        ramInUseBytes,
        ramInUseBeforeBytes,
        marks,
      },
      samples,
      guestAlive,
    );
  } finally {
    await sampler.stop();
    sourceEvents.close();
    destinationEvents?.close();
  }
}

async function runPlain(host: Host, scenario: Scenario, options: RunOptions): Promise<RunResult> {
  const source = await spawnPlainQemu(host.spec, 'run', join(host.dir, 'runA', scenario.name));
  host.cleanup.add('stop source QEMU', () => source.kill());
  await warmUp(host, scenario);
  const ramInUseBeforeBytes = await guestRamInUse((command, args) => source.qmp.execute(command, args), scenario.memoryMiB);
  await hostSync();
  const t0 = performance.now();
  const sampler = startSampler((command) => source.qmp.execute(command), t0, options.sampleMs ?? 100);
  try {
    const { destination, ...result } = await plainMigration(host, source, localId, t0);
    const samples = await sampler.stop();
    const ramInUseBytes = await guestRamInUse((command, args) => destination.qmp.execute(command, args), scenario.memoryMiB);
    const guestAlive = await guestGoesOn(host);
    return summarize(
      'plain',
      scenario,
      { ...result, localAllocatedBytes: (await imageInfo(host.localPath, 'qcow2')).allocatedBytes, ramInUseBytes, ramInUseBeforeBytes },
      samples,
      guestAlive,
    );
  } finally {
    await sampler.stop();
  }
}

/** Sets up host A and B from scratch, runs one migration by `method`, tears everything down. */
export function runOnce(method: Method, scenario: Scenario, options: RunOptions = {}): Promise<RunResult> {
  return withCleanup(async (cleanup) => {
    if (method === 'libvirt') {
      if (!options.libvirt) throw new Error('libvirt runs need the libvirt hosts');
      return runLibvirtOnce(options.libvirt, scenario, cleanup);
    }
    const host = await prepareHost(scenario, cleanup, method === 'vmferry-tls' ? options.tls?.storage : undefined);
    // Host write-back of fresh images would compete with the mirror.
    await hostSync();
    if (method === 'plain') return await runPlain(host, scenario, options);
    if (method === 'vmferry') return await runVmferry(host, scenario, options);
    if (!options.tls) throw new Error('vmferry-tls runs need the agents\' TLS identities');
    return await runVmferry(host, scenario, options, options.tls);
  });
}

export type { MigrationPhase };

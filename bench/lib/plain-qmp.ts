/**
 * The baseline: a hybrid live migration issued by hand over raw QMP, with no
 * vmferry code in its path (RawQmp is the whole client). It is the minimal
 * sequence that is correct on QEMU 7.2 (ARCHITECTURE.md, "Facts about QEMU
 * 7.2"), so the comparison measures what vmferry adds, not a known-bad order:
 *
 *   B: qemu-img create the target; start QEMU -incoming defer -S (same command
 *      line as A but for the target's path and the serial logs); late-block-activate, events,
 *      return-path; migrate-incoming tcp:127.0.0.1:0; nbd-server-start;
 *      block-export-add the target writable
 *   A: blockdev-add an NBD node on B's export (discard unmap, no format layer);
 *      blockdev-mirror sync top (A's image is standalone: only its data moves),
 *      QEMU's default copy mode (background); wait BLOCK_JOB_READY
 *   A: events, pause-before-switchover, return-path; max-bandwidth unlimited
 *      (QEMU's default caps it at 32 MiB/s); downtime-limit left at QEMU's 300 ms;
 *      migrate
 *   A at pre-switchover: block-job-cancel, wait BLOCK_JOB_COMPLETED,
 *      job-dismiss, blockdev-del the NBD node; migrate-continue
 *   B on MIGRATION completed: block-export-del, nbd-server-stop, cont
 *   A: query-migrate until downtime is reported; quit
 *
 * The shared volume needs nothing: B's command line already points at it.
 * The QEMU command line is the baseline's own (plain-command-line.ts), as a
 * user writes it; PlainKnobs switch vmferry's choices on one at a time (copy
 * mode, polling, a post-hoc comparison of both ends' RAM before `cont`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { VmSpec } from '../../src/qemu/spec.ts';
import { execFile, freePort } from './common.ts';
import { plainDiskNode, plainQemuArguments, type PlainKnobs } from './plain-command-line.ts';
import { compareGuestRam } from './ram-compare.ts';
import type { Host, RunResult } from './run-types.ts';
import { RawQmp } from './raw-qmp.ts';

/** A QEMU monitored by RawQmp only. */
export interface PlainQemu {
  child: ChildProcess;
  qmp: RawQmp;
  exited: Promise<void>;
  kill(): Promise<void>;
}

export async function spawnPlainQemu(spec: VmSpec, knobs: PlainKnobs, mode: 'run' | 'incoming', runDir: string, qmpOptions: { oob?: boolean } = {}): Promise<PlainQemu> {
  mkdirSync(runDir, { recursive: true });
  const qmpSocket = join(runDir, 'qmp.sock');
  const log = openSync(join(runDir, 'qemu.log'), 'a');
  let child: ChildProcess;
  try {
    child = spawn('qemu-system-x86_64', plainQemuArguments(spec, knobs, mode, qmpSocket), {
      stdio: ['ignore', log, log],
    });
  } finally {
    closeSync(log);
  }
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
  const kill = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  try {
    const qmp = await RawQmp.connect(qmpSocket, undefined, qmpOptions);
    return { child, qmp, exited, kill };
  } catch (err) {
    await kill();
    throw err;
  }
}

const caps = (names: string[]): { capabilities: { capability: string; state: boolean }[] } => ({
  capabilities: names.map((capability) => ({ capability, state: true })),
});

interface QueryMigrate {
  status?: string;
  downtime?: number;
  'error-desc'?: string;
  ram?: { transferred: number; 'dirty-sync-count'?: number };
  'socket-address'?: { port?: string }[];
}

/** Migrates the guest running in `source` (host A) to a new QEMU on host B. */
export async function plainMigration(
  host: Host,
  source: PlainQemu,
  localId: string,
  t0: number,
  knobs: PlainKnobs,
  onDestination?: (reportLog: string) => void,
): Promise<Pick<RunResult, 'totalMs' | 'downtimeMs' | 'pauseMs' | 'ramBytes' | 'mirrorBytes' | 'marks' | 'passes' | 'ramDiffChunks'> & { destination: PlainQemu }> {
  const marks: { label: string; t: number }[] = [];
  // Each mark is the start of a phase, named as vmferry's executor names them.
  const mark = (label: string): void => void marks.push({ label, t: performance.now() - t0 });
  mark('preparing');
  const a = source.qmp;
  const localDisk = host.spec.disks.find((d) => d.id === localId);
  if (localDisk?.source.kind !== 'file') throw new Error(`no local disk ${localId}`);

  // B: target image and the incoming QEMU.
  const target = join(host.poolB, `${host.spec.name}-${localId}.qcow2`);
  const { stdout } = await execFile('qemu-img', ['info', '-U', '--output=json', localDisk.source.path]);
  const virtualSize = (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
  await execFile('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(virtualSize)]);
  const runB = join(host.runB, host.spec.name);
  const destinationSpec: VmSpec = structuredClone(host.spec);
  destinationSpec.disks = destinationSpec.disks.map((d) => (d.id === localId ? { ...d, source: { kind: 'file', path: target, format: 'qcow2' } } : d));
  destinationSpec.serialLogs = [join(runB, 'serial0.log'), join(runB, 'serial1.log')];
  mkdirSync(runB, { recursive: true });
  const destination = await spawnPlainQemu(destinationSpec, knobs, 'incoming', join(runB, 'qemu'));
  host.cleanup.add('stop destination QEMU', () => destination.kill());
  const destinationReport = destinationSpec.serialLogs[1] as string;
  host.destinationReportLog = destinationReport;
  onDestination?.(destinationReport);
  const b = destination.qmp;
  await b.execute('migrate-set-capabilities', caps(['events', 'late-block-activate', 'return-path']));
  await b.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
  const incomingPort = Number((await b.execute<QueryMigrate>('query-migrate'))['socket-address']?.[0]?.port);
  const nbdPort = await freePort();
  await b.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(nbdPort) } } });
  await b.execute('block-export-add', { type: 'nbd', id: `export-${localId}`, 'node-name': plainDiskNode(localId), name: localId, writable: true });

  // A: mirror the local disk until it is in sync.
  const job = `mirror-${localId}`;
  const targetNode = `target-${localId}`;
  mark('mirroring');
  const poller = knobs.pollMs > 0 ? startPolling(a, knobs.pollMs) : undefined;
  await a.execute('blockdev-add', {
    driver: 'nbd',
    'node-name': targetNode,
    server: { type: 'inet', host: '127.0.0.1', port: String(nbdPort) },
    export: localId,
    discard: 'unmap',
  });
  await a.execute('blockdev-mirror', { 'job-id': job, device: plainDiskNode(localId), target: targetNode, sync: 'top', 'auto-dismiss': false, 'copy-mode': knobs.copyMode });
  await a.waitEvent('BLOCK_JOB_READY', (d) => d.device === job, 30 * 60_000);

  // A: RAM and device state, paused before the switch-over.
  mark('migrating');
  await a.execute('migrate-set-capabilities', caps(['events', 'pause-before-switchover', 'return-path']));
  await a.execute('migrate-set-parameters', { 'max-bandwidth': 1e12 });
  await a.execute('migrate', { uri: `tcp:127.0.0.1:${incomingPort}` });
  const paused = await a.waitEvent('MIGRATION', (d) => ['pre-switchover', 'failed', 'cancelled'].includes(String(d.status)), 30 * 60_000);
  if (paused.data.status !== 'pre-switchover') throw new Error(`plain migration ended as ${String(paused.data.status)}`);

  // A at the switch-over point: drain and cancel the mirror while the images are still active.
  mark('paused-at-switchover');
  await poller?.stop();
  await a.execute('block-job-cancel', { device: job });
  const done = await a.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === job, 10 * 60_000);
  if (done.data.error !== undefined || done.data.offset !== done.data.len) throw new Error(`plain mirror did not finish in sync: ${JSON.stringify(done.data)}`);
  await a.execute('job-dismiss', { id: job });
  await a.execute('blockdev-del', { 'node-name': targetNode });
  await a.execute('migrate-continue', { state: 'pre-switchover' });

  // B: once its own side completed, drop the export and run the guest.
  const completed = await b.waitEvent('MIGRATION', (d) => ['completed', 'failed'].includes(String(d.status)), 10 * 60_000);
  if (completed.data.status !== 'completed') throw new Error('plain migration failed on B');
  // Both ends stopped: what B would run on against what A ran on.
  let ramDiffChunks: number[] | undefined;
  if (knobs.compareRam) {
    mark('comparing');
    ramDiffChunks = await compareGuestRam((c, args) => a.execute(c, args), (c, args) => b.execute(c, args), host.spec.memoryMiB);
    mark('compared');
  }
  await b.execute('block-export-del', { id: `export-${localId}` });
  await b.execute('nbd-server-stop');
  await b.execute('cont');

  // A: the downtime figure appears a moment after completion.
  let info: QueryMigrate = {};
  for (let i = 0; i < 500; i++) {
    info = await a.execute<QueryMigrate>('query-migrate');
    if (info.status === 'failed') throw new Error(`plain migration failed on A: ${info['error-desc'] ?? ''}`);
    if (info.status === 'completed' && (info.downtime ?? 0) > 0) break;
    await sleep(20);
  }
  await a.execute('quit').catch(() => undefined); // the reply may be lost as QEMU closes the socket
  await source.exited;
  const totalMs = performance.now() - t0;
  mark('completed');

  const stop = a.events.filter((e) => e.event === 'STOP').at(-1);
  const resume = b.events.find((e) => e.event === 'RESUME');
  return {
    totalMs,
    downtimeMs: info.downtime ?? Number.NaN,
    pauseMs: stop && resume ? (resume.us - stop.us) / 1000 : Number.NaN,
    ramBytes: info.ram?.transferred ?? 0,
    mirrorBytes: Number(done.data.offset),
    marks,
    passes: info.ram?.['dirty-sync-count'] ?? Number.NaN,
    ...(ramDiffChunks ? { ramDiffChunks } : {}),
    destination,
  };
}

/** vmferry's progress polling, as a knob: query-migrate and query-block-jobs every `intervalMs` until stopped. */
function startPolling(qmp: RawQmp, intervalMs: number): { stop(): Promise<void> } {
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      try {
        await Promise.all([qmp.execute('query-migrate'), qmp.execute('query-block-jobs')]);
      } catch {
        return;
      }
      await sleep(intervalMs);
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
    },
  };
}

/**
 * The source half of a migration, on the host where the VM runs: mirrors its
 * local disks into the destination's exports, streams RAM and device state,
 * and at the switch-over point drains the mirrors in libvirt 9.0's order
 * (ARCHITECTURE.md, "Facts about QEMU 7.2").
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { VmferryError, describeError, hasCode } from '../errors.ts';
import { readBlockGraph } from '../qemu/block-graph.ts';
import { locateGuestRam, memoryDigest, memoryDigestMaxMiB, type MemoryDigest } from '../qemu/memory-digest.ts';
import type { QemuProcess } from '../qemu/process.ts';
import { diskNodeName, type VmSpec } from '../qemu/spec.ts';
import { QmpCommandError } from '../qmp/client.ts';
import type { QmpEvent, QmpEventListener } from '../qmp/events.ts';
import type { BlockJobStatus, MigrationInfo, MigrationStatus, MirrorArguments, QemuMonitor } from '../qmp/commands.ts';
import type { SharedWriterFence } from '../storage/writer-fence.ts';
import { removeDurable } from '../util/durable-file.ts';
import { qemuTlsCreds } from '../qemu/tls-creds.ts';
import type { CopyMode } from './plan.ts';
import type { MigrationMilestone, MigrationSettings, MirrorStatus, MirrorTarget, SourceCompletion, SourceRolledBack, SourceSide } from './sides.ts';
import { abortError, raceAbort, timeoutSignal, waitAtMost } from '../util/abort.ts';
import { waitPostcopyPaused } from './postcopy.ts';
import { renewRbdClients } from './rbd-client-swap.ts';

export interface QemuSourceOptions {
  hostId: string;
  vm: QemuProcess;
  /** The one-writer fence: a rollback takes the shared volumes' leases back before the guest runs again. */
  fence?: SharedWriterFence;
  /**
   * The agent has a TLS identity, so its QEMUs carry its client credentials
   * (qemuTlsCreds): the guest's memory and disks leave only over TLS, and never
   * for a destination that takes plain TCP.
   */
  tls?: boolean;
  logger?: Logger;
}

/**
 * Where a mirror's NBD target node is on the source: `adding` from just before
 * its blockdev-add is sent until the reply, so a rollback in between removes
 * it if QEMU added it.
 */
type TargetState = 'adding' | 'attached' | 'removed';

interface MirrorJob {
  diskId: string;
  jobId: string;
  targetNode: string;
  /** Bytes the job copied, known once it completed. */
  bytesSent?: number;
  target: TargetState;
  /**
   * From just before its blockdev-add is sent until QEMU answered its
   * blockdev-mirror: QEMU may be building its target node or job, and a yank
   * of the target then must wait (#settleBuilds).
   */
  building: boolean;
}

/** vmferry's names for the mirror of disk `diskId` on the source: never one of the guest's own nodes (diskNodeName). */
function mirrorNames(diskId: string): { jobId: string; targetNode: string } {
  return { jobId: `mirror-${diskId}`, targetNode: `mirror-target-${diskId}` };
}

/** Mirror job events after which progress is worth reading at once. */
const mirrorEvents: readonly string[] = ['BLOCK_JOB_READY', 'BLOCK_JOB_ERROR', 'BLOCK_JOB_COMPLETED'];
const milestones: readonly string[] = ['pre-switchover', 'postcopy-active', 'postcopy-paused', 'completed', 'failed', 'cancelled'];
/** Statuses from which migrate_cancel brings the guest back on the source. */
const cancellable: readonly (MigrationStatus | undefined)[] = ['setup', 'active', 'pre-switchover', 'device', 'wait-unplug'];
/** QEMU's own default caps migration at 32 MiB/s; "unlimited" needs an explicit large value. */
const unlimitedBandwidth = 1e12;
/** A query-migrate unanswered this long in a rollback means the main loop is stuck on the dead link. */
const unresponsiveMs = 3_000;
/** yank runs on the monitor thread and answers at once, unless the monitor itself is gone. */
const yankTimeoutMs = 5_000;
/**
 * How long a rollback waits for QEMU to finish what the requests in flight
 * sent before it yanks, and then for its `stop` of the guest: a
 * blockdev-add, blockdev-mirror or stop with a live destination takes
 * milliseconds; a main loop silent this long is stuck (a cut link).
 */
const buildsSettleMs = 2_000;

/**
 * QEMU takes migration capabilities only before a migration starts, so
 * auto-converge is on from the start but held at a 1 % throttle (1 % of each
 * 10 ms slice asleep) until the escalation ladder releases it
 * (releaseThrottle). Then QEMU's own defaults apply: 20 % at first, 10 more
 * per pass that still dirties faster than it sends, at most 99 %.
 */
const heldThrottle = { 'cpu-throttle-initial': 1, 'cpu-throttle-increment': 1, 'max-cpu-throttle': 1 };
const releasedThrottle = { 'cpu-throttle-initial': 20, 'cpu-throttle-increment': 10, 'max-cpu-throttle': 99 };

/** QEMU sends RESUME before its reply to cont: a wait this long only covers a slow monitor. */
const resumeEventMs = 2_000;

/** How long a disk node another user holds is asked again for a mirror, and how often (#mirrorDisk). */
const rootWaitMs = 3_000;
const rootRetryMs = 100;

type YankKind = 'migration' | 'block-node';

/** An entry of query-yank (qapi/yank.json). */
interface YankInstance {
  type: 'block-node' | 'chardev' | 'migration';
  'node-name'?: string;
  id?: string;
}

/** The host of a `tcp:HOST:PORT` migration URI (an IPv6 address in brackets comes without them). */
function uriHost(uri: string): string {
  const host = /^tcp:(.+):\d+$/.exec(uri)?.[1];
  if (host === undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', `a migration URI must be tcp:HOST:PORT (got "${uri}")`);
  return host.replace(/^\[(.*)\]$/, '$1');
}

async function namedNodes(qmp: QemuMonitor, signal: AbortSignal): Promise<Set<string>> {
  const nodes = await qmp.client.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true }, { signal });
  return new Set(nodes.map((n) => n['node-name']));
}

/** Deletes a retired source's local disks, durably: after a power loss the old host must not come back with them. */
export async function removeLocalCopies(spec: VmSpec): Promise<void> {
  for (const disk of spec.disks) {
    if (disk.source.kind === 'file' && !disk.readOnly) await removeDurable(disk.source.path);
  }
}

export class QemuSource implements SourceSide {
  readonly hostId: string;
  readonly #vm: QemuProcess;
  readonly #logger: Logger | undefined;
  readonly #mirrors: MirrorJob[] = [];
  #events: QmpEventListener | undefined;
  /** Mirror job events since the mirrors started, so none slips between two progress queries. */
  #mirrorEvents: QmpEventListener | undefined;
  #wasRunning: boolean | undefined;
  /** Once post-copy may have begun the migration is never yanked: the guest's memory would be split. */
  #postcopyRequested = false;
  /** QEMU's timestamp of the guest's STOP during the migration, once read from the events. */
  #stoppedAtUs: number | null = null;
  /** QEMU's timestamps of the milestones waited for, for the post-copy phase's length. */
  readonly #milestoneAtUs = new Map<MigrationMilestone, number>();

  readonly #fence: SharedWriterFence | undefined;
  readonly #tls: boolean;
  /** A cap set while the migration runs (a host drain's share of its budget): it holds over the plan's, for jobs running and to come. */
  #bandwidthBytes: number | undefined;
  /** Aborted when a rollback begins: requests that change QEMU's state still in flight stop, and new ones are refused. */
  readonly #ending = new AbortController();
  /** Those requests in flight, settled or not: a rollback waits for them before it looks at what to undo. */
  readonly #acting = new Set<Promise<void>>();
  /** The rollback running, if any: a second one (two controllers', or an agent's and a controller's) waits for it. */
  #rollingBack: Promise<unknown> | undefined;
  /** QEMU answered every request sent before the rollback began: none still builds a mirror target or job. */
  #buildsAnswered = false;
  /** When the rollback stopped the running guest (#pauseGuest), by performance.now(). */
  #pausedAt: number | undefined;

  constructor(options: QemuSourceOptions) {
    this.hostId = options.hostId;
    this.#vm = options.vm;
    this.#fence = options.fence;
    this.#tls = options.tls ?? false;
    this.#logger = options.logger;
  }

  /**
   * The source half of a migration an earlier agent process was running: what
   * it had started (mirror jobs and their targets) is read back from QEMU, and
   * whether the guest ran before comes from the agent's durable record, so a
   * rollback finds everything to undo and resumes the guest.
   */
  static async recover(options: QemuSourceOptions, wasRunning: boolean): Promise<QemuSource> {
    const source = new QemuSource(options);
    source.#wasRunning = wasRunning;
    const [jobs, nodes] = await options.vm.qmp('reading what the migration had started', async (qmp) => [
      await qmp.queryBlockJobs(),
      await qmp.client.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true }),
    ]);
    const names = new Set(nodes.map((n) => n['node-name']));
    for (const job of jobs.filter((j) => j.device.startsWith('mirror-'))) {
      const diskId = job.device.slice('mirror-'.length);
      const mirror = mirrorNames(diskId);
      source.#mirrors.push({ diskId, ...mirror, target: names.has(mirror.targetNode) ? 'attached' : 'removed', building: false });
    }
    for (const name of names) {
      // A target whose job already ended (finished at the switch-over) is still attached until removed.
      if (!name.startsWith('mirror-target-')) continue;
      const diskId = name.slice('mirror-target-'.length);
      if (!source.#mirrors.some((m) => m.diskId === diskId)) source.#mirrors.push({ diskId, ...mirrorNames(diskId), target: 'attached', building: false });
    }
    return source;
  }

  async startMirrors(targets: MirrorTarget[], copyMode: CopyMode, bandwidthBytes: number | undefined, signal: AbortSignal): Promise<void> {
    for (const target of targets) this.#checkTls(target.tls, target.server.type === 'inet' ? target.server.host : target.server.path);
    await this.#act(signal, (signal) => this.#startMirrors(targets, copyMode, bandwidthBytes, signal));
  }

  async #startMirrors(targets: MirrorTarget[], copyMode: CopyMode, bandwidthBytes: number | undefined, signal: AbortSignal): Promise<void> {
    await this.#rememberRunState();
    await this.#qmp('starting mirrors', async (qmp) => {
      this.#mirrorEvents ??= qmp.client.listen();
      await this.#removeLeftovers(qmp, targets.map((t) => t.diskId), signal);
      for (const target of targets) {
        const job: MirrorJob = { diskId: target.diskId, ...mirrorNames(target.diskId), target: 'adding', building: true };
        const server =
          target.server.type === 'inet'
            ? { type: 'inet', host: target.server.host, port: String(target.server.port) }
            : { type: 'unix', path: target.server.path };
        // No format layer over the target and discard=unmap: unallocated areas then cost a
        // zero-write, not a copy, and the job does not walk the whole virtual size.
        // The destination's certificate must name the address connected to, as a browser checks a URL's host.
        const tls = this.#tls ? { 'tls-creds': qemuTlsCreds.client, ...(server.type === 'inet' ? { 'tls-hostname': server.host } : {}) } : {};
        // Known before the request leaves: a rollback that looks while QEMU adds the node must remove it.
        this.#mirrors.push(job);
        await qmp.blockdevAdd({ driver: 'nbd', 'node-name': job.targetNode, server, export: target.exportName, discard: 'unmap', ...tls }, { signal });
        job.target = 'attached';
        await this.#mirrorDisk(
          qmp,
          {
            'job-id': job.jobId,
            device: diskNodeName(target.diskId),
            target: job.targetNode,
            sync: target.sync,
            'copy-mode': copyMode,
            'auto-dismiss': false,
            ...((this.#bandwidthBytes ?? bandwidthBytes) === undefined ? {} : { speed: this.#bandwidthBytes ?? bandwidthBytes }),
          },
          signal,
        );
        job.building = false;
      }
    });
  }

  /**
   * blockdev-mirror, which QEMU refuses ("Need a root block node") while
   * anything but the disk's device uses its node: another job, or the filter
   * of a mirror that ended, which leaves the graph only once QEMU frees its
   * job. A refusal is asked again for at most rootWaitMs (CI saw one once,
   * after a rollback, its cause not known), then the error names the user.
   */
  async #mirrorDisk(qmp: QemuMonitor, args: MirrorArguments, signal: AbortSignal): Promise<void> {
    const deadline = performance.now() + rootWaitMs;
    for (;;) {
      try {
        return await qmp.blockdevMirror(args, { signal });
      } catch (err) {
        if (!(err instanceof QmpCommandError) || err.description !== 'Need a root block node') throw err;
        const users = await readBlockGraph(this.#vm, signal).then(
          (graph) => graph.nonRootParents(args.device).join(', ') || 'nothing the block graph shows',
          (graphErr: unknown) => `something unknown (the block graph could not be read: ${describeError(graphErr)})`,
        );
        if (performance.now() >= deadline) {
          throw new VmferryError('VMF_MIGRATION_FAILED', `QEMU on ${this.hostId} will not mirror ${args.device}: for ${rootWaitMs} ms it was in use by ${users}`, { cause: err });
        }
        this.#logger?.warn(`QEMU on ${this.hostId} will not mirror ${args.device} yet: it is in use by ${users}`);
        await sleep(rootRetryMs, undefined, { signal });
      }
    }
  }

  async mirrorStatus(signal: AbortSignal, waitMs = 0): Promise<MirrorStatus[]> {
    if (waitMs > 0) await this.#waitMirrorEvent(signal, waitMs);
    const jobs = await this.#qmp('reading mirror progress', (qmp) => qmp.queryBlockJobs({ signal }));
    return this.#mirrors.map((mirror) => {
      const job = jobs.find((j) => j.device === mirror.jobId);
      if (!job) return { diskId: mirror.diskId, offset: 0, len: 0, ready: false, error: 'the mirror job disappeared' };
      const status: MirrorStatus = { diskId: mirror.diskId, offset: job.offset, len: job.len, ready: job.ready };
      if (job.error) status.error = job.error;
      else if (job.status === 'concluded' || job.status === 'aborting') status.error = `the mirror job ended early (${job.status})`;
      return status;
    });
  }

  async #waitMirrorEvent(signal: AbortSignal, waitMs: number): Promise<void> {
    const jobIds = new Set(this.#mirrors.map((m) => m.jobId));
    const telling = (e: QmpEvent): boolean => mirrorEvents.includes(e.event) && jobIds.has(String(e.data.device));
    await this.#mirrorEvents?.waitFor('*', telling, { signal, timeoutMs: waitMs }).catch((err: unknown) => {
      // Quiet for waitMs: the caller reads progress anyway.
      if (!hasCode(err, 'VMF_TIMEOUT')) throw err;
    });
  }

  /**
   * Caps the mirrors and the RAM stream at `bytesPerSecond` from now on: QEMU's
   * block-job-set-speed on every mirror still copying, and max-bandwidth (and
   * its post-copy twin) on the migration, set before it starts as well.
   */
  async setBandwidth(bytesPerSecond: number, signal: AbortSignal): Promise<void> {
    await this.#act(signal, (signal) => this.#setBandwidth(bytesPerSecond, signal));
  }

  async #setBandwidth(bytesPerSecond: number, signal: AbortSignal): Promise<void> {
    this.#bandwidthBytes = bytesPerSecond;
    await this.#qmp('changing the bandwidth cap', async (qmp) => {
      const jobs = await qmp.queryBlockJobs({ signal });
      const own = new Set(this.#mirrors.map((m) => m.jobId));
      // A concluded job refuses set-speed, and copies nothing more anyway.
      for (const job of jobs.filter((j) => own.has(j.device) && (j.status === 'running' || j.status === 'ready'))) {
        await qmp.client.execute('block-job-set-speed', { device: job.device, speed: bytesPerSecond }, { signal });
      }
      await qmp.migrateSetParameters({ 'max-bandwidth': bytesPerSecond, 'max-postcopy-bandwidth': bytesPerSecond }, { signal });
    });
  }

  async startMigration(uri: string, settings: MigrationSettings, signal: AbortSignal): Promise<void> {
    const host = uriHost(uri);
    this.#checkTls(settings.tls, host);
    await this.#act(signal, (signal) => this.#startMigration(uri, host, settings, signal));
  }

  async #startMigration(uri: string, host: string, settings: MigrationSettings, signal: AbortSignal): Promise<void> {
    const maxBandwidthBytes = this.#bandwidthBytes ?? settings.maxBandwidthBytes;
    await this.#rememberRunState();
    // Found now, not in the pause, for the digest of the guest's RAM the switch-over asks for under TCG (the plan's
    // compareMemory; KVM guests have none). A failure here is the digest's to report, with its own context, when it asks again.
    if (this.#vm.spec.memoryMiB <= memoryDigestMaxMiB) {
      const kvm = await this.#qmp('asking which accelerator runs the guest', (qmp) => qmp.queryKvm({ signal }));
      if (!kvm.enabled) await locateGuestRam(this.#vm).catch(() => undefined);
    }
    await this.#qmp('starting the migration', async (qmp) => {
      await qmp.migrateSetCapabilities(
        {
          events: true,
          'pause-before-switchover': true,
          'return-path': true,
          'auto-converge': true,
          'postcopy-ram': settings.allowPostcopy,
        },
        { signal },
      );
      await qmp.migrateSetParameters(
        {
          'downtime-limit': settings.downtimeLimitMs,
          'max-bandwidth': maxBandwidthBytes ?? unlimitedBandwidth,
          // Post-copy has a cap of its own (0: none): the user's cap holds there too.
          ...(settings.allowPostcopy ? { 'max-postcopy-bandwidth': maxBandwidthBytes ?? 0 } : {}),
          // Set every time, either way: QEMU keeps parameters across migrations, and this QEMU may have been started
          // (then re-adopted) by an agent of the other kind.
          'tls-creds': this.#tls ? qemuTlsCreds.client : '',
          'tls-hostname': this.#tls ? host : '',
          ...heldThrottle,
        },
        { signal },
      );
      // Opened before migrate, so no MIGRATION event can slip past (or before stopGuest, whose STOP it keeps).
      this.#events ??= qmp.client.listen();
      await qmp.migrate(uri, { signal });
    });
  }

  migrationInfo(signal: AbortSignal): Promise<MigrationInfo> {
    return this.#qmp('reading migration progress', (qmp) => qmp.queryMigrate({ signal }));
  }

  async waitMilestone(signal: AbortSignal): Promise<MigrationMilestone> {
    for (;;) {
      const milestone = await this.nextMilestone(signal, 60_000);
      if (milestone) return milestone;
    }
  }

  /**
   * The next milestone, or undefined when none came within `waitMs`. The
   * agent serves waits in such slices: a wait that lasts as long as the
   * migration would keep a half "in contact" for as long as a dead
   * controller's connection looks open (see agent/contact-log.ts).
   */
  async nextMilestone(signal: AbortSignal, waitMs: number): Promise<MigrationMilestone | undefined> {
    if (!this.#events) throw new VmferryError('VMF_CONFLICT', `no migration was started on ${this.hostId}`);
    try {
      const event = await this.#events.waitFor('MIGRATION', (e) => milestones.includes(String(e.data.status)), { signal, timeoutMs: waitMs });
      const milestone = event.data.status as MigrationMilestone;
      this.#milestoneAtUs.set(milestone, event.timestampUs);
      return milestone;
    } catch (err) {
      // Events that come meanwhile stay in the listener's buffer for the next wait.
      if (hasCode(err, 'VMF_TIMEOUT')) return undefined;
      throw err;
    }
  }

  async setDowntimeLimit(ms: number, signal: AbortSignal): Promise<void> {
    await this.#act(signal, (signal) => this.#qmp('raising the downtime limit', (qmp) => qmp.migrateSetParameters({ 'downtime-limit': ms }, { signal })));
  }

  async releaseThrottle(signal: AbortSignal): Promise<void> {
    await this.#act(signal, (signal) => this.#qmp('releasing the auto-converge throttle', (qmp) => qmp.migrateSetParameters(releasedThrottle, { signal })));
  }

  async stopGuest(signal: AbortSignal): Promise<void> {
    await this.#act(signal, async (signal) => {
      // Remembered first: the rollback resumes only a guest that ran before the migration touched it.
      await this.#rememberRunState();
      await this.#qmp('stopping the guest', async (qmp) => {
        // Opened before stop: a guest already stopped gets no STOP from the migration's switch-over, so this one
        // is where its pause begins.
        this.#events ??= qmp.client.listen();
        await qmp.stop({ signal });
      });
    });
  }

  async startPostcopy(signal: AbortSignal): Promise<void> {
    await this.#act(signal, async (signal) => {
      this.#postcopyRequested = true;
      await this.#qmp('starting post-copy', (qmp) => qmp.migrateStartPostcopy({ signal }));
    });
  }

  async pausePostcopy(signal: AbortSignal): Promise<void> {
    await this.#act(signal, async (signal) => {
      await this.#qmp('pausing post-copy', async (qmp) => {
        if ((await qmp.queryMigrate({ signal })).status === 'postcopy-active') await qmp.migratePause({ signal });
      });
      await waitPostcopyPaused(`post-copy on ${this.hostId}`, () => this.migrationInfo(signal), signal);
    });
  }

  async resumePostcopy(uri: string, signal: AbortSignal): Promise<void> {
    // The TLS parameters set at startMigration still hold: the new stream goes to the same host.
    await this.#act(signal, (signal) => this.#qmp('resuming post-copy', (qmp) => qmp.migrateResume(uri, { signal })));
  }

  finishMirrors(signal: AbortSignal): Promise<{ diskId: string; bytesSent: number }[]> {
    return this.#act(signal, (signal) => this.#finishMirrors(signal));
  }

  async #finishMirrors(signal: AbortSignal): Promise<{ diskId: string; bytesSent: number }[]> {
    await this.#eachMirror((mirror, listener) => this.#drainAndCancel(mirror, listener, signal));
    await this.#removeTargets(signal);
    this.#mirrorEvents?.close();
    return this.#mirrors.map((m) => ({ diskId: m.diskId, bytesSent: m.bytesSent ?? 0 }));
  }

  async continueSwitchover(signal: AbortSignal): Promise<void> {
    await this.#act(signal, (signal) => this.#qmp('continuing the switch-over', (qmp) => qmp.migrateContinue('pre-switchover', { signal })));
  }

  memoryDigest(signal: AbortSignal): Promise<MemoryDigest> {
    return memoryDigest(this.#vm, signal);
  }

  async completedInfo(signal: AbortSignal): Promise<SourceCompletion> {
    // Right after completion query-migrate may still report downtime 0 for a moment.
    for (;;) {
      const info = await this.migrationInfo(signal);
      if (info.status === 'failed' || info.status === 'cancelled') {
        throw new VmferryError('VMF_MIGRATION_FAILED', `migration on ${this.hostId} ended as "${info.status}": ${info['error-desc'] ?? ''}`);
      }
      if (info.status === 'completed' && info.downtime !== undefined && info.downtime > 0) return { info, stoppedAtUs: this.#guestStoppedAtUs(), ...this.#postcopyLength() };
      await sleep(20, undefined, { signal });
    }
  }

  /** Post-copy's length by the source's own clock, when it ran and both its events were waited for. */
  #postcopyLength(): { postcopyMs?: number } {
    const started = this.#milestoneAtUs.get('postcopy-active');
    const completed = this.#milestoneAtUs.get('completed');
    return started === undefined || completed === undefined ? {} : { postcopyMs: Math.round((completed - started) / 1000) };
  }

  /**
   * When QEMU stopped the guest for the switch-over: the last STOP since the
   * migration started (the migration's listener keeps the events nobody waited for).
   */
  #guestStoppedAtUs(): number | null {
    const stop = this.#events?.takeBuffered('STOP').at(-1);
    if (stop) this.#stoppedAtUs = stop.timestampUs;
    return this.#stoppedAtUs;
  }

  async retire(keepLocalDisks: boolean): Promise<void> {
    // Never once a rollback began: it resumes the guest here.
    await this.#act(undefined, () => this.#retire(keepLocalDisks));
  }

  async #retire(keepLocalDisks: boolean): Promise<void> {
    this.#events?.close();
    this.#events = undefined;
    await this.#vm.stop({ quitTimeoutMs: 10_000 });
    await this.#vm.cleanup();
    if (!keepLocalDisks) await removeLocalCopies(this.#vm.spec);
  }

  rollback(): Promise<SourceRolledBack> {
    this.#ending.abort(new VmferryError('VMF_CONFLICT', `the source half of this migration on ${this.hostId} is rolling back: nothing more starts there`));
    const rollback = (this.#rollingBack ?? Promise.resolve()).catch(() => undefined).then(() => this.#rollback());
    this.#rollingBack = rollback;
    return rollback;
  }

  async #rollback(): Promise<SourceRolledBack> {
    const signal = timeoutSignal(`the rollback of the source on ${this.hostId}`, 60_000);
    await this.#settleBuilds(signal);
    await this.#pauseGuest(signal);
    // Then, out of band: after a cut link, requests stuck on the mirror targets hold QEMU's main loop, and a
    // migrate_cancel sent before this yank waits behind them (test/faults/link-cut.test.ts). What they carry
    // is abandoned anyway.
    await this.#yankTargets(signal);
    // A request that was in flight when the rollback began (an old leader's, admitted before the new leader's
    // epoch reached this agent) was aborted: once it settles it sends nothing more, and what it did send QEMU runs
    // before the commands below (one monitor, in order), so they see all it added.
    await raceAbort(Promise.all(this.#acting), signal, `the requests in flight on the source on ${this.hostId}`);
    const info = await this.#migrationInfoUnstuck(signal);
    if (info.status === 'postcopy-active' || info.status === 'postcopy-paused') {
      throw new VmferryError('VMF_MIGRATION_FAILED', `post-copy already started on ${this.hostId}: the guest's memory is split and cannot return`);
    }
    // From pre-switchover on, QEMU paused the guest itself and resumes it on migrate_cancel, beside mirrors still
    // ending (their targets yanked): the guest must not write while they end (#pauseGuest), so they go first.
    const resumedByCancel = info.status === 'pre-switchover' || info.status === 'device';
    if (resumedByCancel) await this.#endMirrors(signal);
    if (cancellable.includes(info.status)) {
      await this.#qmp('cancelling the migration', (qmp) => qmp.migrateCancel({ signal }));
      await this.#waitMigrationSettled(signal);
    }
    if (!resumedByCancel) await this.#endMirrors(signal);
    const stoppedAtUs = this.#guestStoppedAtUs();
    this.#events?.close();
    this.#events = undefined;
    this.#mirrorEvents?.close();
    const status = await this.#vm.status();
    if (this.#pausedAt !== undefined && !status.running) {
      // It ran here until the rollback's own stop, so no destination should hold its leases; taken back all the
      // same, as every resume here does, since a guest must never write without them.
      await this.#fence?.claim(this.#vm.spec, signal);
      await this.#qmp('resuming the guest on the source', (qmp) => qmp.cont({ signal }));
      return { pauseMs: Math.round(performance.now() - this.#pausedAt) };
    }
    if (!this.#wasRunning || status.running) return { pauseMs: null };
    // A destination that claimed the shared volumes (then was killed) holds their leases: take them back first.
    await this.#fence?.claim(this.#vm.spec, signal);
    // A destination fences the RBD images' other clients only once the migration completed here: then this QEMU's may be
    // blocklisted, and the guest would stop at its first write to them.
    if (info.status === 'completed') await renewRbdClients(this.#vm, signal, this.#logger);
    using resumed = this.#vm.monitor.client.listen();
    // After a completed migration the images are inactive; cont re-activates them.
    await this.#qmp('resuming the guest on the source', (qmp) => qmp.cont({ signal }));
    const resume = await resumed.waitFor('RESUME', undefined, { signal, timeoutMs: resumeEventMs }).catch(() => undefined);
    return { pauseMs: stoppedAtUs !== null && resume ? Math.round((resume.timestampUs - stoppedAtUs) / 1000) : null };
  }

  /** Cancels every mirror job and removes its target node, whatever state they are in. */
  async #endMirrors(signal: AbortSignal): Promise<void> {
    await this.#eachMirror((mirror, listener) => this.#forceCancel(mirror, listener, signal));
    await this.#removeTargets(signal);
  }

  /** Runs `act` on every mirror at once, with one listener for their jobs' events, open from before the first command. */
  async #eachMirror(act: (mirror: MirrorJob, listener: QmpEventListener) => Promise<void>): Promise<void> {
    using listener = this.#vm.monitor.client.listen();
    await Promise.all(this.#mirrors.map((mirror) => act(mirror, listener)));
  }

  /**
   * Runs a request that changes QEMU's state, unless a rollback began. Its
   * signal aborts when one begins, so it stops at its next wait (a command
   * the QMP client still holds back is never sent), and the rollback sends
   * nothing until it settled (its yank, for a bounded time, nothing until QEMU
   * answered what it sent): what it did send, QEMU runs first.
   */
  #act<T>(signal: AbortSignal | undefined, request: (signal: AbortSignal) => Promise<T>): Promise<T> {
    if (this.#ending.signal.aborted) return Promise.reject(abortError(this.#ending.signal, 'a request to the source'));
    const result = request(signal ? AbortSignal.any([signal, this.#ending.signal]) : this.#ending.signal);
    const settled: Promise<void> = result.then(
      () => void this.#acting.delete(settled),
      () => void this.#acting.delete(settled),
    );
    this.#acting.add(settled);
    return result;
  }

  /** Before anything connects: TLS on one side only would fail in a handshake, or worse, send in the clear. */
  #checkTls(destinationTls: boolean, destination: string): void {
    if (destinationTls === this.#tls) return;
    const fix = 'give every agent a TLS identity of the cluster\'s CA (--pki-dir), or none';
    throw new VmferryError(
      'VMF_MIGRATION_REFUSED',
      destinationTls
        ? `TLS mismatch: the destination at ${destination} takes migration streams over TLS only, but the agent on ${this.hostId} has no TLS identity to connect with; ${fix}`
        : `TLS mismatch: the agent on ${this.hostId} has a TLS identity and sends a guest's memory and disks over TLS only, but the destination at ${destination} takes plain TCP (its agent has no TLS identity); ${fix}`,
    );
  }

  async #drainAndCancel(mirror: MirrorJob, listener: QmpEventListener, signal: AbortSignal): Promise<void> {
    // Cancelling a READY mirror completes it without pivoting: it first copies what is still dirty.
    await this.#qmp(`cancelling mirror of disk ${mirror.diskId}`, (qmp) => qmp.blockJobCancel(mirror.jobId, false, { signal }));
    const done = await listener.waitFor('BLOCK_JOB_COMPLETED', (e) => e.data.device === mirror.jobId, { signal });
    const offset = Number(done.data.offset);
    const len = Number(done.data.len);
    if (done.data.error !== undefined || offset !== len) {
      throw new VmferryError(
        'VMF_MIGRATION_FAILED',
        `mirror of disk ${mirror.diskId} did not finish in sync (offset ${offset} of ${len}${typeof done.data.error === 'string' ? `: ${done.data.error}` : ''})`,
      );
    }
    mirror.bytesSent = offset;
    await this.#qmp(`dismissing mirror of disk ${mirror.diskId}`, (qmp) => qmp.jobDismiss(mirror.jobId, { signal }));
  }

  async #forceCancel(mirror: MirrorJob, listener: QmpEventListener, signal: AbortSignal): Promise<void> {
    const jobs = await this.#qmp('reading mirror jobs', (qmp) => qmp.queryBlockJobs({ signal }));
    const job = jobs.find((j) => j.device === mirror.jobId);
    if (!job) return;
    if (job.status !== 'concluded' && (await this.#cancelUnlessEnding(mirror, signal)) !== 'concluded') {
      await listener.waitFor('JOB_STATUS_CHANGE', (e) => e.data.id === mirror.jobId && e.data.status === 'concluded', { signal });
    }
    await this.#qmp(`dismissing mirror of disk ${mirror.diskId}`, (qmp) => qmp.jobDismiss(mirror.jobId, { signal }));
  }

  /**
   * Cancels a mirror job. QEMU refuses one that already ends by itself (its
   * target yanked, its destination gone): then its status says whether it has.
   */
  async #cancelUnlessEnding(mirror: MirrorJob, signal: AbortSignal): Promise<BlockJobStatus | undefined> {
    try {
      await this.#qmp(`cancelling mirror of disk ${mirror.diskId}`, (qmp) => qmp.blockJobCancel(mirror.jobId, true, { signal }));
      return undefined;
    } catch (err) {
      const status = (await this.#qmp('reading mirror jobs', (qmp) => qmp.queryBlockJobs({ signal }))).find((j) => j.device === mirror.jobId)?.status;
      if (err instanceof QmpCommandError && (status === 'aborting' || status === 'concluded')) return status;
      throw err;
    }
  }

  /**
   * query-migrate for the rollback. After a cut link QEMU's main loop can
   * stall for a minute on what it still sends to the destination (TCP
   * retransmits), and every in-band command with it. When the answer does not come
   * promptly, the migration stream and the mirror targets are yanked out of
   * band: the monitor thread shuts their sockets down without the main loop,
   * so what waits on them fails at once and the main loop answers.
   */
  async #migrationInfoUnstuck(signal: AbortSignal): Promise<MigrationInfo> {
    const info = this.migrationInfo(signal);
    const answered = await Promise.race([info.then(() => true, () => true), sleep(unresponsiveMs, false, { signal })]);
    if (!answered) {
      const kinds: YankKind[] = this.#postcopyRequested ? ['block-node'] : ['migration', 'block-node'];
      this.#logger?.warn(`QEMU on ${this.hostId} did not answer query-migrate within ${unresponsiveMs} ms: yanking ${kinds.join(' and ')} connections`);
      // If the yank fails, the answer may still come; its own timeout says what went wrong.
      await this.#yank(kinds, signal).catch((err: unknown) => {
        this.#logger?.warn({ err: describeError(err) }, `yanking on ${this.hostId} failed`);
      });
    }
    return info;
  }

  /**
   * Waits, at most buildsSettleMs, until the requests in flight settled (the
   * rollback aborted them) and QEMU answered all they had sent. QEMU runs a
   * yank on its monitor thread, beside what its main loop runs: a yank that
   * landed while QEMU still ran the mirrors' blockdev-add or blockdev-mirror
   * for the node yanked crashed QEMU 7.2 (SIGSEGV, its heap corrupted;
   * test/migration/destination-death.test.ts). After a cut link the main loop
   * may not answer for minutes: then #yank leaves out the targets still being
   * built, and the others are yanked all the same.
   */
  async #settleBuilds(signal: AbortSignal): Promise<void> {
    const client = this.#vm.monitor.client;
    const answered = Promise.allSettled([...this.#acting])
      .then(() => client.answered())
      .then(() => {
        this.#buildsAnswered = true;
      });
    await waitAtMost(answered, buildsSettleMs, signal);
    if (!this.#buildsAnswered && this.#mirrors.some((m) => m.building && m.target !== 'removed')) {
      this.#logger?.warn(
        `QEMU on ${this.hostId} did not answer ${client.unanswered.join(', ')} within ${buildsSettleMs} ms: the mirror targets it is still building are not yanked`,
      );
    }
  }

  /**
   * Stops the guest before its mirror jobs are yanked and cancelled; the end
   * of the rollback continues it. An active (write-blocking) mirror of QEMU
   * 7.2 ended while the guest writes, in its first moments, corrupted QEMU's
   * heap (SIGSEGV or SIGABRT, test/migration/destination-death.test.ts); with
   * the guest stopped none did in our runs. The pause lasts the rollback, tens of
   * milliseconds. After a cut link `stop` waits on the requests stuck on the
   * targets: it is waited for at most buildsSettleMs, and the yank that
   * follows frees it.
   */
  async #pauseGuest(signal: AbortSignal): Promise<void> {
    this.#pausedAt = undefined;
    // A main loop that left the settle wait unanswered is stuck, and runs no guest I/O either.
    if (this.#mirrors.length === 0 || !this.#buildsAnswered) return;
    // A stop sent after the rollback moved on could land after its last look at the guest and leave it stopped.
    let late = false;
    const stopped = (async () => {
      // A guest the migration paused already (its switch-over) is resumed as before, after its leases.
      if (!(await this.#vm.status()).running || late) return;
      this.#pausedAt = performance.now();
      await this.#qmp('pausing the guest for the rollback', (qmp) => qmp.stop({ signal }));
    })();
    await waitAtMost(stopped, buildsSettleMs, signal).catch((err: unknown) => {
      // The rollback's next command says what went wrong (QEMU gone); the guest then stays as it is.
      this.#logger?.warn({ err: describeError(err) }, `pausing the guest on ${this.hostId} for the rollback failed`);
    });
    late = true;
  }

  /**
   * Mirror requests stuck on a dead link (a cut cable retransmits for many
   * minutes) would hold the job's cancel and the target's removal: yank
   * shuts the targets' sockets down so they fail at once. The data on them is
   * being abandoned anyway.
   */
  async #yankTargets(signal: AbortSignal): Promise<void> {
    await this.#yank(['block-node'], signal);
  }

  /**
   * Yanks what of `kinds` QEMU lists as yankable: the migration stream, and of
   * the block nodes only the mirror targets still attached (never the VM's own
   * disks), and none QEMU may still be building (#settleBuilds). Out of band
   * when the monitor allows it, so it works while the main loop is stuck.
   */
  async #yank(kinds: YankKind[], signal: AbortSignal): Promise<void> {
    const yankable = (m: MirrorJob): boolean => m.target !== 'removed' && (this.#buildsAnswered || !m.building);
    const targets = new Set(this.#mirrors.filter(yankable).map((m) => m.targetNode));
    if (!kinds.includes('migration') && targets.size === 0) return;
    await this.#qmp(`yanking ${kinds.join(' and ')} connections`, async (qmp) => {
      const options = { signal, oob: qmp.client.oobEnabled, timeoutMs: yankTimeoutMs };
      const yankable = await qmp.client.execute<YankInstance[]>('query-yank', undefined, options);
      const instances = yankable.filter(
        (i) => (i.type === 'migration' && kinds.includes('migration')) || (i.type === 'block-node' && kinds.includes('block-node') && targets.has(i['node-name'] ?? '')),
      );
      if (instances.length === 0) return;
      await qmp.client.execute('yank', { instances }, options).catch((err: unknown) => {
        // An instance that went away since query-yank (the migration failed by itself) has nothing left to yank.
        if (!(err instanceof QmpCommandError && err.errorClass === 'DeviceNotFound')) throw err;
      });
    });
  }

  /** The NBD target nodes go before the destination deletes its exports (which fails while a client is attached). */
  async #removeTargets(signal: AbortSignal): Promise<void> {
    if (this.#mirrors.some((m) => m.target === 'adding')) {
      // A blockdev-add that failed, or was never sent: only QEMU knows. Asked after it, so it has answered.
      const nodes = await this.#qmp('listing block nodes', (qmp) => namedNodes(qmp, signal));
      for (const mirror of this.#mirrors) if (mirror.target === 'adding') mirror.target = nodes.has(mirror.targetNode) ? 'attached' : 'removed';
    }
    for (const mirror of this.#mirrors) {
      if (mirror.target !== 'attached') continue;
      await this.#qmp(`removing mirror target of disk ${mirror.diskId}`, (qmp) => qmp.blockdevDel(mirror.targetNode, { signal }));
      mirror.target = 'removed';
    }
  }

  /**
   * A mirror job or target node of an earlier migration of this VM that its
   * rollback missed (an agent of an older version could, when a request raced
   * it) would fail this one's blockdev-add with "Duplicate nodes". Only
   * vmferry's own names are touched, and none of this migration's; what a job
   * carried was abandoned with it.
   */
  async #removeLeftovers(qmp: QemuMonitor, diskIds: string[], signal: AbortSignal): Promise<void> {
    const [jobs, nodes] = [await qmp.queryBlockJobs({ signal }), await namedNodes(qmp, signal)];
    const leftovers = diskIds
      .filter((diskId) => !this.#mirrors.some((m) => m.diskId === diskId))
      .map((diskId) => ({ diskId, ...mirrorNames(diskId) }))
      .filter((m) => nodes.has(m.targetNode) || jobs.some((j) => j.device === m.jobId));
    if (leftovers.length === 0) return;
    this.#logger?.warn({ leftovers: leftovers.map((m) => m.jobId) }, `removing mirror jobs and targets an earlier migration left on ${this.hostId}`);
    using listener = qmp.client.listen();
    for (const leftover of leftovers) {
      await this.#forceCancel({ ...leftover, target: nodes.has(leftover.targetNode) ? 'attached' : 'removed', building: false }, listener, signal);
      if (nodes.has(leftover.targetNode)) await qmp.blockdevDel(leftover.targetNode, { signal });
    }
  }

  async #waitMigrationSettled(signal: AbortSignal): Promise<void> {
    for (;;) {
      const info = await this.#migrationInfoUnstuck(signal);
      if (!cancellable.includes(info.status) && info.status !== 'cancelling') return;
      await sleep(50, undefined, { signal });
    }
  }

  async #rememberRunState(): Promise<void> {
    if (this.#wasRunning !== undefined) return;
    this.#wasRunning = (await this.#vm.status()).running;
  }

  #qmp<T>(what: string, call: (qmp: QemuMonitor) => Promise<T>): Promise<T> {
    return this.#vm.qmp(what, call).catch((err: unknown) => {
      this.#logger?.debug({ err: describeError(err) }, `${what} failed on ${this.hostId}`);
      throw err;
    });
  }
}

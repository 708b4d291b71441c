/**
 * The destination half of a migration, on the host that receives the VM:
 * creates the mirror targets in its pool, starts the VM with `-incoming defer`
 * (same devices, same disk ids; shared disks point at the same exports) and
 * exports the targets writable over NBD for the source's mirrors.
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { VmferryError, describeError, hasCode } from '../errors.ts';
import { locateGuestRam, memoryDigest, type MemoryDigest } from '../qemu/memory-digest.ts';
import { preloadSetNoDelay, setNoDelay } from '../qemu/socket-nodelay.ts';
import { opensDirect, type Accelerator } from '../qemu/command-line.ts';
import { QemuProcess } from '../qemu/process.ts';
import type { VmSpec } from '../qemu/spec.ts';
import type { QmpEventListener } from '../qmp/events.ts';
import { QmpCommandError } from '../qmp/client.ts';
import { createOverlay } from '../storage/disk-images.ts';
import type { LocalPool } from '../storage/local-pool.ts';
import type { SharedWriterFence } from '../storage/writer-fence.ts';
import { RbdWriter, rbdWatchers } from '../storage/rbd-fence.ts';
import { removeDurable } from '../util/durable-file.ts';
import { faultPoint, faultPointKills } from '../util/fault-points.ts';
import { raceAbort, timeoutSignal } from '../util/abort.ts';
import { findFreePort } from '../util/ports.ts';
import { qemuTlsCreds } from '../qemu/tls-creds.ts';
import { FilledTargets, checkDirectIo } from './filled-targets.ts';
import type { DestinationFate } from './no-return.ts';
import type { GuestReset } from './phases.ts';
import { defaultAnnounce, postcopyCapable, type AnnounceSettings, type MigrationPlan } from './plan.ts';
import type { DestinationResumed, DestinationSide, IncomingRunnable, MirrorTarget, PreparedDestination } from './sides.ts';

export interface QemuDestinationOptions {
  hostId: string;
  pool: LocalPool;
  /** The directory of a VM on this host: its serial logs, and QEMU's run files under qemu/. */
  vmDir: (vm: string) => string;
  /** The address the source reaches this host at, for the migration stream and the NBD exports. */
  address: string;
  /** The host's accelerator for the incoming QEMU; default TCG, as tests start QEMU directly. */
  accel?: Accelerator;
  /**
   * The agent's TLS identity in QEMU's layout (src/qemu/tls-creds.ts), when it
   * has one: the migration stream and the mirror exports then take TLS only,
   * from clients with a certificate of the cluster's CA.
   */
  tlsDir?: string;
  /**
   * The name QEMU reads from the certificate of a host's agent (qemuPeerName),
   * when it can be known: then only the source's agent gets in, not any other
   * holder of a cluster certificate (an operator, another agent).
   */
  agentPeerName?: (hostId: string) => string;
  /** The one-writer fence of shared volumes; without it they are not fenced. */
  fence?: SharedWriterFence;
  logger?: Logger;
}

/** How often a post-copy destination is asked whether its device state is loaded: it takes milliseconds. */
const incomingPollMs = 10;

/** How long one look at an incoming post-copy's state may wait for QEMU's main loop before the recovery tries again. */
const incomingLookMs = 1_000;

/** How long a recovery waits before it asks QEMU to listen again, while the stream is not paused yet. */
const recoverRetryMs = 100;

/** How many ports a recovery tries to listen on: another process may take a port between its choice and QEMU's bind. */
const recoverListenTries = 3;

/** A dead QEMU's monitor socket ends when the kernel closes it at exit; this only bounds the wait should it not. */
const monitorEndTimeoutMs = 5_000;

/** The authz object of a destination QEMU: who may send it the guest. */
const sourceAuthzId = 'vmf-authz-source';

/** Name of the mirror target volume for a VM's disk in the destination pool. */
export function targetVolumeName(vm: string, diskId: string, format: string): string {
  return `${vm}-${diskId}.${format}`;
}

export class QemuDestination implements DestinationSide {
  readonly hostId: string;
  readonly #options: QemuDestinationOptions;
  #vm: QemuProcess | undefined;
  #events: QmpEventListener | undefined;
  #resumedAtUs: number | null = null;
  #createdVolumes: string[] = [];
  #exportIds: string[] = [];
  #nbdServerStarted = false;
  #resumed = false;
  /** A `cont` went to this QEMU: should it die without a reply, only its RESUME event can say whether the guest ran. */
  #contSent = false;
  /** What that event said of a QEMU that died with a `cont` in flight, once read: a fact, asked again by the agent and the controller. */
  #ranBeforeItDied: boolean | undefined;
  /** The resume in progress: a rollback or a fate question waits for it instead of racing it on the same QEMU. */
  #resuming: Promise<void> | undefined;
  #vmName: string | undefined;
  /** The source's spec, whose writer tokens get the shared volumes back if we claimed them and then failed. */
  #sourceSpec: VmSpec | undefined;
  #claimed = false;
  /** This QEMU's RBD clients (rbd-fence.ts), and whether it fenced the others at switch-over. */
  #rbd: RbdWriter | undefined;
  #rbdFenced = false;
  #announce: AnnounceSettings = defaultAnnounce;
  #postcopy = false;
  /** Where this half last listened for a resumed post-copy stream (recoverPostcopy). */
  #recoverUri: string | undefined;
  /** Mirror targets filled through the page cache, switched to their cache mode before the guest runs here. */
  #filled: FilledTargets | undefined;

  constructor(options: QemuDestinationOptions) {
    this.hostId = options.hostId;
    this.#options = options;
  }

  /** The running VM once prepared; after resume it is the migrated guest. */
  get vm(): QemuProcess | undefined {
    return this.#vm;
  }

  async prepare(spec: VmSpec, plan: MigrationPlan, signal: AbortSignal): Promise<PreparedDestination> {
    const { pool, address } = this.#options;
    this.#vmName = spec.name;
    this.#sourceSpec = spec;
    this.#announce = plan.options.announce ?? defaultAnnounce;
    const vmDir = this.#options.vmDir(spec.name);
    // The destination QEMU opens shared volumes under its own writer tokens: it may read now, write only once it claims them.
    const destinationSpec: VmSpec = this.#options.fence ? await this.#options.fence.tokenize(spec, signal) : structuredClone(spec);
    destinationSpec.serialLogs = (spec.serialLogs ?? []).map((_, i) => join(vmDir, `serial${i}.log`));

    const mirrored = plan.disks.filter((d) => d.operation === 'mirror');
    for (const disk of destinationSpec.disks) {
      const planned = mirrored.find((d) => d.id === disk.id);
      if (!planned || disk.source.kind !== 'file') continue;
      const name = targetVolumeName(spec.name, disk.id, disk.source.format);
      // An overlay's target is an overlay on the same base (the planner saw this host reach it), so the mirror sends only the overlay's data.
      disk.source.path = disk.source.backing
        ? await createOverlay(pool, name, disk.source.backing, { sizeBytes: planned.virtualSize, probe: false })
        : await pool.create(name, disk.source.format, planned.virtualSize);
      this.#createdVolumes.push(name);
    }
    signal.throwIfAborted();

    // Who has its RBD images open before it opens them: the source, and anyone the switch-over must fence with it.
    const rbdBefore = await rbdWatchers(destinationSpec);
    if (mirrored.length > 0) preloadSetNoDelay();
    // Its taps are made (on the NICs' bridges) before -incoming: the device state that arrives expects its backends.
    // The copies a mirror fills are opened through the page cache until the RAM phase starts (filled-targets.ts).
    const filled = destinationSpec.disks.filter((disk) => opensDirect(disk) && mirrored.some((d) => d.id === disk.id));
    for (const disk of filled) await checkDirectIo(disk, this.hostId);
    const vm = await QemuProcess.start(destinationSpec, {
      mode: 'incoming',
      runDir: join(vmDir, 'qemu'),
      accel: this.#options.accel ?? 'tcg',
      logger: this.#options.logger,
      tapRole: 'incoming',
      bufferedDisks: filled.map((d) => d.id),
      ...(this.#options.tlsDir === undefined ? {} : { tlsDir: this.#options.tlsDir }),
    });
    this.#vm = vm;
    if (filled.length > 0) this.#filled = new FilledTargets(vm, filled, vm.monitor.client.listen(), this.#options.logger);
    this.#rbd = await RbdWriter.learn(destinationSpec, rbdBefore, this.#options.logger);
    // Its fence connected to the cluster now, so the guest's pause at switch-over holds a message, not a program's start.
    await this.#rbd.readyFence();
    // Opened before migrate-incoming, so the completion event cannot be missed.
    this.#events = vm.monitor.client.listen();
    const tls = await this.#secureStreams(vm, plan.from, signal);
    await vm.qmp('setting up the incoming migration', async (qmp) => {
      await qmp.migrateSetCapabilities(
        { events: true, 'late-block-activate': true, 'return-path': true, 'postcopy-ram': postcopyCapable(plan) },
        { signal },
      );
      if (tls) await qmp.migrateSetParameters({ 'tls-creds': tls.creds, ...(tls.authz === undefined ? {} : { 'tls-authz': tls.authz }) }, { signal });
      await qmp.migrateIncoming(`tcp:${address}:0`, { signal });
    });
    const migrationPort = await this.#incomingPort(signal);
    // Found now, not in the pause: the digest would otherwise look for the guest's RAM while the guest waits.
    // A failure here is the digest's to report, with its own context, when it asks again.
    if (plan.ram.compareMemory) await locateGuestRam(vm).catch(() => undefined);

    const mirrorTargets: MirrorTarget[] = [];
    if (mirrored.length > 0) {
      const nbdPort = await findFreePort(address);
      await vm.qmp('exporting mirror targets', async (qmp) => {
        await qmp.nbdServerStart({ type: 'inet', host: address, port: String(nbdPort) }, tls, { signal });
        this.#nbdServerStarted = true;
        // Before the source connects: the socket it is accepted on inherits the option (socket-nodelay.ts).
        await setNoDelay(vm.pid, nbdPort).catch((err: unknown) =>
          this.#options.logger?.warn({ err: describeError(err) }, `the mirror targets' connections on ${this.hostId} keep Nagle's algorithm on: each waits for delayed ACKs`),
        );
        for (const disk of mirrored) {
          const exportId = `mirror-${disk.id}`;
          await qmp.blockExportAdd({ id: exportId, nodeName: `disk-${disk.id}`, name: disk.id, writable: true }, { signal });
          this.#exportIds.push(exportId);
          mirrorTargets.push({ diskId: disk.id, sync: disk.mirrorSync ?? 'full', server: { type: 'inet', host: address, port: nbdPort }, exportName: disk.id, tls: tls !== undefined });
        }
      });
    }
    return { migrationUri: `tcp:${address}:${migrationPort}`, tls: tls !== undefined, mirrorTargets };
  }

  /**
   * With a TLS identity: the credentials both listeners take, and an authz
   * object that lets in only the source's agent (when its certificate's name
   * can be known). Without one, nothing: plain TCP, as before TLS.
   */
  async #secureStreams(vm: QemuProcess, sourceHost: string, signal: AbortSignal): Promise<{ creds: string; authz?: string } | undefined> {
    if (this.#options.tlsDir === undefined) return undefined;
    const peerName = this.#options.agentPeerName?.(sourceHost);
    if (peerName === undefined) return { creds: qemuTlsCreds.server };
    await vm.qmp('letting in only the source', (qmp) => qmp.objectAdd({ 'qom-type': 'authz-simple', id: sourceAuthzId, identity: peerName }, { signal }));
    return { creds: qemuTlsCreds.server, authz: sourceAuthzId };
  }

  async waitIncomingCompleted(signal: AbortSignal): Promise<void> {
    const events = this.#requireEvents();
    const event = await events.waitFor('MIGRATION', (e) => ['completed', 'failed', 'cancelled'].includes(String(e.data.status)), { signal });
    if (event.data.status !== 'completed') {
      throw new VmferryError('VMF_MIGRATION_FAILED', `incoming migration on ${this.hostId} ended as "${String(event.data.status)}"`);
    }
  }

  async waitIncomingRunnable(signal: AbortSignal): Promise<IncomingRunnable> {
    const events = this.#requireEvents();
    const ended = ['completed', 'failed', 'cancelled', 'postcopy-paused'];
    const event = await events.waitFor('MIGRATION', (e) => ['postcopy-active', ...ended].includes(String(e.data.status)), { signal });
    if (event.data.status === 'completed') return 'completed';
    if (event.data.status !== 'postcopy-active') throw this.#incomingEnded(String(event.data.status));
    // postcopy-active comes with the source's "listen" command, before the device state it sends next. QEMU leaves
    // `inmigrate` once that is loaded and the "run" command came (for `paused`: -S keeps the vCPUs stopped for our cont).
    const vm = this.#requireVm();
    for (;;) {
      const failed = events.takeBuffered('MIGRATION').find((e) => ended.includes(String(e.data.status)) && e.data.status !== 'completed');
      if (failed) throw this.#incomingEnded(String(failed.data.status));
      if ((await vm.status()).status !== 'inmigrate') {
        this.#postcopy = true;
        return 'postcopy';
      }
      await sleep(incomingPollMs, undefined, { signal });
    }
  }

  #incomingEnded(status: string): VmferryError {
    return new VmferryError('VMF_MIGRATION_FAILED', `incoming migration on ${this.hostId} became "${status}" before the guest could run here`);
  }

  memoryDigest(signal: AbortSignal): Promise<MemoryDigest> {
    return memoryDigest(this.#requireVm(), signal);
  }

  /**
   * Listens anew for a broken post-copy stream; returns the URI the source resumes to. Nothing here may wait for
   * B's main loop: a vCPU that faulted on a page the cut stream never brought can hold it until the stream is back
   * (docs/QEMU-TCG-PRECOPY.md, "Post-copy"). So the pause and the listen go out of band, to a port chosen here
   * (query-migrate, which would tell QEMU's, is in-band), and QEMU's refusal of the listen says when the stream is
   * not paused yet. QEMU 7.2 listens once per pause: after a resume that never connected, the listener it keeps
   * is the one to resume to.
   */
  async recoverPostcopy(signal: AbortSignal): Promise<string> {
    const vm = this.#requireVm();
    const { address } = this.#options;
    await this.#pauseIncoming(vm, signal);
    for (let bindTries = 0; ; ) {
      const uri = `tcp:${address}:${await findFreePort(address)}`;
      try {
        await vm.qmp('listening for the resumed post-copy', (qmp) => qmp.migrateRecover(uri, { signal }));
        this.#recoverUri = uri;
        return uri;
      } catch (err) {
        if (!(err instanceof QmpCommandError)) throw err;
        if (/triggered already/i.test(err.description) && this.#recoverUri) return this.#recoverUri;
        if (/only be run when postcopy is paused/i.test(err.description)) {
          await this.#awaitIncomingPaused(vm, signal);
        } else if (++bindTries >= recoverListenTries) {
          throw new VmferryError('VMF_MIGRATION_FAILED', `the incoming post-copy on ${this.hostId} cannot listen anew: ${err.description}`, { cause: err });
        }
      }
    }
  }

  async #pauseIncoming(vm: QemuProcess, signal: AbortSignal): Promise<void> {
    // Refused when the stream is not postcopy-active: already paused by the break itself, the usual case.
    await vm.qmp('pausing the incoming post-copy', (qmp) => qmp.migratePause({ signal })).catch((err: unknown) => {
      if (!(err instanceof QmpCommandError)) throw err;
    });
  }

  /**
   * One look at an incoming post-copy not paused yet, bounded: an end state fails the recovery at once, a live
   * stream is paused again, and no answer (the main loop held) waits for the next try.
   */
  async #awaitIncomingPaused(vm: QemuProcess, signal: AbortSignal): Promise<void> {
    const status = await vm.qmp('reading the incoming post-copy', (qmp) => qmp.queryMigrate({ signal, timeoutMs: incomingLookMs })).then(
      (info) => info.status,
      (err: unknown) => {
        signal.throwIfAborted();
        if (hasCode(err, 'VMF_TIMEOUT')) return undefined;
        throw err;
      },
    );
    if (status === 'postcopy-active') await this.#pauseIncoming(vm, signal);
    else if (status !== undefined && status !== 'postcopy-paused' && status !== 'postcopy-recover') {
      throw new VmferryError('VMF_MIGRATION_FAILED', `the incoming post-copy on ${this.hostId} is "${status}", not paused: it cannot be recovered`);
    }
    await sleep(recoverRetryMs, undefined, { signal });
  }

  /** Its guest may be continued before all of its RAM is here: the half may still have to recover the stream after resume. */
  get inPostcopy(): boolean {
    return this.#postcopy;
  }

  /** Where this side stands, for a restarted controller deciding whether to finish or roll back. */
  get state(): 'prepared' | 'resuming' | 'resumed' {
    return this.#resumed ? 'resumed' : this.#resuming ? 'resuming' : 'prepared';
  }

  async resume(signal: AbortSignal): Promise<DestinationResumed> {
    if (this.#resuming) throw new VmferryError('VMF_CONFLICT', `the destination on ${this.hostId} is already resuming`);
    const resuming = this.#resume(signal);
    this.#resuming = resuming.then(() => undefined, () => undefined);
    try {
      return { resumedAtUs: await resuming };
    } finally {
      this.#resuming = undefined;
    }
  }

  async fate(): Promise<DestinationFate> {
    await this.#resuming;
    if (this.#resumed) return 'guest-ran';
    const vm = this.#vm;
    const status = await vm?.statusUnlessExited();
    if (status) return guestNeverRan(status) ? 'never-ran' : 'guest-ran';
    if (!vm || !this.#contSent) return 'gone';
    this.#ranBeforeItDied ??= await this.#resumeAnnounced(vm);
    return this.#ranBeforeItDied ? 'guest-ran' : 'gone';
  }

  /**
   * Whether a QEMU that died with a `cont` in flight had announced RESUME. QEMU
   * sends the event before its vCPUs run (vm_prepare_start), on the connection
   * this half's listener reads: once that connection has ended, a missing event
   * means the guest never ran here. A connection that does not end leaves it
   * unknown, and that is an error, so that nobody settles the migration on a guess.
   */
  async #resumeAnnounced(vm: QemuProcess): Promise<boolean> {
    const unknown = `whether the guest ran on ${this.hostId} cannot be told: its QEMU died after a cont was sent`;
    const events = this.#events;
    if (!events) throw new VmferryError('VMF_MIGRATION_FAILED', `${unknown}, and its events were no longer read`);
    const what = `the monitor connection of VM ${vm.spec.name}'s dead QEMU ending`;
    try {
      await raceAbort(vm.monitor.client.closed, timeoutSignal(what, monitorEndTimeoutMs), what);
    } catch (err) {
      throw new VmferryError('VMF_MIGRATION_FAILED', `${unknown}, and ${describeError(err)}`, { cause: err });
    }
    return events.takeBuffered('RESUME').length > 0;
  }

  /** Returns QEMU's timestamp of the guest's RESUME, the end of its pause (null if the event was not seen). */
  async #resume(signal: AbortSignal): Promise<number | null> {
    const vm = this.#requireVm();
    await vm.qmp('resuming the migrated guest', async (qmp) => {
      for (const id of this.#exportIds) await qmp.blockExportDel(id, 'safe', { signal });
      this.#exportIds = [];
      if (this.#nbdServerStarted) await qmp.nbdServerStop({ signal });
      this.#nbdServerStarted = false;
      await this.#filled?.settled(signal);
      // The source has stopped and flushed (its images went inactive at completion): the shared volumes' writer moves here.
      if (this.#options.fence) {
        this.#claimed = true;
        await this.#options.fence.claim(vm.spec, signal);
        faultPoint('destination-after-claim');
      }
      // The same for RBD images: the source, should it run on, and any stale writer are cut off before the guest runs here.
      if (this.#rbd) {
        this.#rbdFenced = true;
        await this.#rbd.fenceOthers();
      }
      // A test's crash of QEMU between the fence and the cont: the next command finds it gone, and no cont was sent.
      if (await faultPointKills('destination-qemu-dies-after-fence', vm)) await qmp.queryStatus();
      this.#contSent = true;
      await qmp.cont({ signal });
      // A test's crash of QEMU after it ran the cont and before its reply arrived: the next command finds it gone.
      if (await faultPointKills('destination-qemu-dies-in-cont', vm)) await qmp.queryStatus();
    });
    this.#resumed = true;
    await faultPointKills('destination-qemu-dies-after-cont', vm);
    // QEMU sends RESUME before its reply to cont, so it is already in the buffer of the listener opened at prepare.
    const resumedAtUs = this.#events?.takeBuffered('RESUME').at(-1)?.timestampUs ?? null;
    this.#resumedAtUs = resumedAtUs;
    if (vm.spec.nics?.length) await this.#announceNics(vm);
    const status = await vm.status();
    if (!status.running) throw new VmferryError('VMF_MIGRATION_FAILED', `guest on ${this.hostId} is "${status.status}" after cont`);
    // In post-copy the listener stays until postcopyResets: the guest's resets while the rest of its RAM arrives.
    if (!this.#postcopy) this.#events?.close();
    return resumedAtUs;
  }

  postcopyResets(): Promise<GuestReset[]> {
    const events = this.#events;
    if (!this.#postcopy || !this.#resumed || !events) {
      return Promise.reject(new VmferryError('VMF_CONFLICT', `the guest was not resumed in post-copy on ${this.hostId}, or its resets were already read`));
    }
    const resets = events.takeBuffered('RESET');
    events.close();
    this.#events = undefined;
    const resumedAtUs = this.#resumedAtUs;
    return Promise.resolve(
      resets.map((e) => ({ reason: typeof e.data.reason === 'string' ? e.data.reason : 'unknown', afterResumeMs: resumedAtUs === null ? null : Math.round((e.timestampUs - resumedAtUs) / 1000) })),
    );
  }

  /**
   * Switches see the guest's MACs behind this host now instead of after the
   * guest's next packet. Past the point of no return, so a failure is logged, not thrown.
   */
  async #announceNics(vm: QemuProcess): Promise<void> {
    const { initialMs, maxMs, rounds, stepMs } = this.#announce;
    await vm
      .qmp('announcing the guest on its new host', (qmp) => qmp.announceSelf({ initial: initialMs, max: maxMs, rounds, step: stepMs }))
      .catch((err: unknown) => this.#options.logger?.warn({ err: describeError(err) }, `announcing the NICs of ${vm.spec.name} on ${this.hostId} failed`));
  }

  async rollback(): Promise<void> {
    await this.#resuming;
    this.#rbd?.release();
    // A cont whose reply was lost still counts: the guest's own state decides, not our bookkeeping.
    if ((await this.fate()) === 'guest-ran') throw new VmferryError('VMF_CONFLICT', `the guest already ran on ${this.hostId}; refusing to roll back`);
    this.#events?.close();
    this.#filled?.abandon();
    if (this.#vm) {
      await this.#vm.kill();
      // Its clients may have been the images' only writer for a moment: cut off, the source can take the images back at once.
      if (this.#rbdFenced) await this.#rbd?.fenceSelf();
      this.#rbdFenced = false;
      this.#rbd = undefined;
      // Killed first, so it cannot write, then the source (which rollback resumes) gets the volumes back.
      if (this.#claimed && this.#options.fence && this.#sourceSpec) await this.#options.fence.claim(this.#sourceSpec);
      this.#claimed = false;
      await this.#vm.cleanup();
      this.#vm = undefined;
    }
    for (const name of this.#createdVolumes) await this.#options.pool.remove(name);
    this.#createdVolumes = [];
    if (this.#vmName) await removeDurable(this.#options.vmDir(this.#vmName));
  }

  async #incomingPort(signal: AbortSignal): Promise<number> {
    const info = await this.#requireVm().qmp('reading the incoming port', (qmp) =>
      qmp.client.execute<{ 'socket-address'?: { port?: string }[] }>('query-migrate', undefined, { signal }),
    );
    const port = Number(info['socket-address']?.[0]?.port);
    if (!Number.isInteger(port) || port <= 0) {
      throw new VmferryError('VMF_MIGRATION_FAILED', `destination QEMU on ${this.hostId} did not report its incoming migration port`);
    }
    return port;
  }

  #requireVm(): QemuProcess {
    if (!this.#vm) throw new VmferryError('VMF_CONFLICT', `destination ${this.hostId} is not prepared`);
    return this.#vm;
  }

  #requireEvents(): QmpEventListener {
    if (!this.#events) throw new VmferryError('VMF_CONFLICT', `destination ${this.hostId} is not prepared`);
    return this.#events;
  }
}

/**
 * Run states of an incoming QEMU that was never continued (QEMU's RunState):
 * vmferry never stops a guest that ran, so any other state means it ran.
 */
const neverContinued: readonly string[] = ['inmigrate', 'prelaunch', 'paused', 'finish-migrate', 'postmigrate', 'restore-vm'];

export function guestNeverRan(status: { running: boolean; status: string }): boolean {
  return !status.running && neverContinued.includes(status.status);
}

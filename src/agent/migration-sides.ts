/**
 * The halves of migrations this host takes part in, by migration id. The
 * controller drives them over HTTP; each half is the same QemuSource or
 * QemuDestination the in-process tests use. A finished half updates the VM
 * registry: the destination adopts the migrated guest, the source forgets it.
 *
 * A half the controller has not touched for `abandonAfterMs` lost its
 * controller (crashed, or cut off). Where it is safe without the other side,
 * the agent settles it alone: a source whose migration has not been told to
 * continue rolls back, so a guest paused at pre-switchover runs again; a
 * destination whose QEMU has exited is removed. A half past that point stays
 * for the controller's recovery, since only both sides together know which
 * copy of the guest may run.
 */
import type { MigrationHalves, VmInfo } from '../api/agent-types.ts';
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import type { MigrationStatus } from '../qmp/commands.ts';
import { measureGuestRam, probeDestination, probeSource, qemuCapabilities, type QemuCapabilities } from '../migration/probe.ts';
import type { GuestRamFacts } from '../migration/prediction.ts';
import type { CopyMode, DestinationFacts, MigrationPlan, SourceFacts } from '../migration/plan.ts';
import { QemuDestination } from '../migration/qemu-destination.ts';
import { QemuSource, removeLocalCopies, type QemuSourceOptions } from '../migration/qemu-source.ts';
import type { QemuProcess } from '../qemu/process.ts';
import type { VmSpec } from '../qemu/spec.ts';
import type { DestinationResumed, MigrationSettings, MirrorTarget, PreparedDestination, SourceRolledBack } from '../migration/sides.ts';
import { settlement, type DestinationFate } from '../migration/no-return.ts';
import type { GuestReset, MigrationPhase } from '../migration/phases.ts';
import { readOutgoingRecord, removeOutgoingRecord, writeIncomingRecord, writeOutgoingRecord } from './half-records.ts';
import { ContactLog } from './contact-log.ts';
import { faultPoint, faultPointKillsAll } from '../util/fault-points.ts';
import type { VmRegistry } from './vm-registry.ts';
import { checkTargets } from './request-guard.ts';
import { timeoutSignal } from '../util/abort.ts';

interface SourceHalf {
  vm: string;
  side: QemuSource;
  /** Where its disks and RAM may go: the destination address of the plan it was begun with (kept in outgoing.json across agent restarts). */
  destination?: string;
  /** Set while the agent settles it alone: the controller's requests are refused, and its rollback waits for this. */
  settling?: Promise<void>;
}

/**
 * Source statuses from which a rollback cannot lose the guest: the migration
 * never got past pre-switchover (QEMU waits there for migrate-continue), so
 * no destination can have the whole guest.
 */
const sourceSafeToRollBack: readonly (MigrationStatus | undefined)[] = [undefined, 'none', 'setup', 'active', 'pre-switchover', 'failed', 'cancelled'];

export interface MigrationSidesOptions {
  /** After this long without a request from the controller, a half is settled here where that is safe; 0: never. */
  abandonAfterMs: number;
  /** The certificate name of a host's agent, when it can be known: a destination here lets in only its source (QemuDestinationOptions). */
  agentPeerName?: (hostId: string) => string;
}

/** 60 s: far beyond any gap between the controller's requests, short enough for a guest paused at pre-switchover. */
export const defaultAbandonAfterMs = 60_000;

function retiredDisksReason(id: string, vm: string): string {
  return `migration ${id} was settled by an operator on its destination: ${vm}'s local disks as this source left them, an older state of the guest`;
}

export class MigrationSides {
  readonly #registry: VmRegistry;
  readonly #address: string;
  readonly #logger: Logger;
  readonly #sources = new Map<string, SourceHalf>();
  readonly #destinations = new Map<string, QemuDestination>();
  readonly #contact = new ContactLog();
  /** Why a half is gone, for the controller's requests that come after the agent settled it alone. */
  readonly #settledHere = new Map<string, string>();
  /** Prepares still running: a rollback waits for them, or the QEMU they start would outlive it. */
  readonly #preparing = new Map<string, Promise<void>>();
  /**
   * Destination halves that ended in this process: adopted (the guest ran here) or rolled back (gone).
   * Bounded: the controller asks about a migration only until it settles, and an adopted guest's
   * `incoming.json` answers for it after the oldest entries are dropped.
   */
  readonly #endedDestinations = new Map<string, DestinationFate>();
  /**
   * Destination halves resumed in post-copy, by migration id: the guest runs here (adopted) while its
   * RAM still arrives, and a broken stream is recovered through them. Bounded as #endedDestinations.
   */
  readonly #postcopyDestinations = new Map<string, QemuDestination>();
  /**
   * Source halves whose QEMU died with an earlier agent process (a power loss), by migration id: the
   * guest is gone from this host, its disks are not. The controller says what they are: an old copy
   * once the migration completed (retire deletes them), or the VM itself when it did not (rollback
   * keeps them, the VM stopped here for its owner to start).
   */
  readonly #deadSources = new Map<string, string>();
  readonly #warned = new Set<string>();
  readonly #abandonAfterMs: number;
  readonly #agentPeerName: ((hostId: string) => string) | undefined;
  readonly #sweeper: NodeJS.Timeout | undefined;
  #sweeping = false;
  /** Asked once (a short-lived QEMU answers the CPU models); concurrent first callers share the question. */
  #qemu: Promise<QemuCapabilities> | undefined;

  constructor(registry: VmRegistry, address: string, logger: Logger, options: MigrationSidesOptions = { abandonAfterMs: defaultAbandonAfterMs }) {
    this.#registry = registry;
    this.#address = address;
    this.#logger = logger;
    this.#abandonAfterMs = options.abandonAfterMs;
    this.#agentPeerName = options.agentPeerName;
    if (this.#abandonAfterMs > 0) {
      const everyMs = Math.min(5_000, Math.max(250, this.#abandonAfterMs / 4));
      this.#sweeper = setInterval(() => {
        this.#settleAbandoned().catch((err: unknown) => this.#logger.error({ err: describeError(err) }, 'checking for abandoned migrations failed'));
      }, everyMs);
      this.#sweeper.unref();
    }
  }

  close(): void {
    clearInterval(this.#sweeper);
  }

  capabilities(): Promise<QemuCapabilities> {
    this.#qemu ??= qemuCapabilities(this.#registry.accelerator.accelerator).catch((err: unknown) => {
      // A failure is asked again next time, not remembered.
      this.#qemu = undefined;
      throw err;
    });
    return this.#qemu;
  }

  async probeSource(vm: string): Promise<SourceFacts> {
    return probeSource(this.#registry.hostId, this.#registry.running(vm), await this.capabilities());
  }

  /** The running guest's dirty rate and memory in use, for the prediction of its migration. */
  measureGuestRam(vm: string): Promise<GuestRamFacts> {
    return measureGuestRam(this.#registry.running(vm));
  }

  async probeDestination(spec: VmSpec): Promise<DestinationFacts> {
    // The probe connects to the spec's shared volumes: only to the storage server's.
    this.#registry.guard.sharedServers(spec);
    return probeDestination(this.#registry.hostId, this.#address, spec, this.#registry.pool, this.#registry.names(), await this.capabilities(), this.#registry.qemuTlsDir);
  }

  /**
   * Binds a migration id to a running VM on this host, as its source, and to
   * the destination address of its plan: the only place its disks and RAM may go.
   */
  async beginSource(id: string, plan: Pick<MigrationPlan, 'vm' | 'from' | 'toAddress'>): Promise<void> {
    const { vm } = plan;
    if (plan.from !== this.#registry.hostId) throw new VmferryError('VMF_FORBIDDEN', `migration ${id} is planned from ${plan.from}, not from ${this.#registry.hostId}`);
    const existing = this.#sources.get(id);
    if (existing) {
      if (existing.vm !== vm) throw new VmferryError('VMF_CONFLICT', `migration ${id} on ${this.#registry.hostId} is of VM ${existing.vm}, not ${vm}`);
      if (existing.destination !== undefined && existing.destination !== plan.toAddress) {
        throw new VmferryError('VMF_CONFLICT', `migration ${id} goes to ${existing.destination}; it cannot be re-pointed at ${plan.toAddress}`);
      }
      existing.destination = plan.toAddress;
    } else {
      // One migration of a VM at a time: two halves would share its mirrors' names, and each would take the other's for its own leftovers.
      const other = [...this.#sources].find(([, half]) => half.vm === vm)?.[0] ?? [...this.#deadSources].find(([, deadVm]) => deadVm === vm)?.[0];
      if (other !== undefined) throw new VmferryError('VMF_CONFLICT', `VM ${vm} is still the source of migration ${other} on ${this.#registry.hostId}: that one must be settled first`);
      const running = this.#registry.running(vm);
      this.#registry.setMigrating(vm, true);
      const half: SourceHalf = { vm, destination: plan.toAddress, side: new QemuSource({ ...this.#sourceOptions(id), vm: running }) };
      this.#sources.set(id, half);
      try {
        // Before anything moves: an agent restarted mid-migration must find this half again to roll it back.
        await writeOutgoingRecord(this.#registry.vmDir(vm), { migration: id, wasRunning: (await running.status()).running, destination: plan.toAddress });
      } catch (err) {
        this.#sources.delete(id);
        this.#registry.setMigrating(vm, false);
        throw err;
      }
    }
    this.#contact.touch(sourceKey(id));
  }

  /**
   * Takes back the source halves an earlier agent process left (it crashed or
   * was restarted mid-migration): their QEMUs were re-adopted by the registry.
   */
  async recoverSources(): Promise<void> {
    for (const vm of this.#registry.names()) {
      const vmDir = this.#registry.vmDir(vm);
      const record = await readOutgoingRecord(vmDir);
      if (!record) continue;
      const qemu = this.#registry.runningOrUndefined(vm);
      if (!qemu) {
        this.#logger.warn({ vm, migration: record.migration }, 'the source QEMU of an unfinished migration is gone; its disks wait for the controller to retire or keep them');
        // Held as migrating until then: a start now would run a guest the migration may have moved on.
        this.#registry.setMigrating(vm, true);
        this.#deadSources.set(record.migration, vm);
        continue;
      }
      const side = await QemuSource.recover({ ...this.#sourceOptions(record.migration), vm: qemu }, record.wasRunning);
      this.#registry.setMigrating(vm, true);
      this.#sources.set(record.migration, { vm, side, ...(record.destination === undefined ? {} : { destination: record.destination }) });
      this.#contact.touch(sourceKey(record.migration));
      this.#logger.warn({ vm, migration: record.migration }, 'took back the source half of an unfinished migration');
    }
  }

  #sourceOptions(id: string): Omit<QemuSourceOptions, 'vm'> {
    return {
      hostId: this.#registry.hostId,
      ...(this.#registry.fence ? { fence: this.#registry.fence } : {}),
      tls: this.#registry.qemuTlsDir !== undefined,
      logger: this.#logger.child({ migration: id }),
    };
  }

  /** Runs one request of the controller's on the source half of `id`. */
  useSource<T>(id: string, call: (side: QemuSource) => Promise<T>): Promise<T> {
    const half = this.#requireSource(id);
    return this.#contact.during(sourceKey(id), () => call(half.side));
  }

  /** Starts the mirrors of the source half of `id`, refused unless every target is its plan's destination. */
  startMirrors(id: string, targets: MirrorTarget[], copyMode: CopyMode, bandwidthBytes: number | undefined, signal: AbortSignal): Promise<void> {
    checkTargets(this.#destinationOf(id), { mirrors: targets });
    return this.useSource(id, (side) => side.startMirrors(targets, copyMode, bandwidthBytes, signal));
  }

  /** Resumes a paused post-copy of the source half of `id`, refused unless `uri` is its plan's destination. */
  resumePostcopy(id: string, uri: string, signal: AbortSignal): Promise<void> {
    checkTargets(this.#destinationOf(id), { uri });
    return this.useSource(id, (side) => side.resumePostcopy(uri, signal));
  }

  /** Starts the RAM migration of the source half of `id`, refused unless `uri` is its plan's destination. */
  startMigration(id: string, uri: string, settings: MigrationSettings, signal: AbortSignal): Promise<void> {
    checkTargets(this.#destinationOf(id), { uri });
    return this.useSource(id, (side) => side.startMigration(uri, settings, signal));
  }

  #destinationOf(id: string): string {
    const destination = this.#requireSource(id).destination;
    // Only a half an agent of an earlier version began, taken back after a restart.
    if (destination === undefined) throw new VmferryError('VMF_CONFLICT', `migration ${id} on ${this.#registry.hostId} has no destination address: begin it again with its plan before sending anything`);
    return destination;
  }

  /** Runs one request of the controller's on the destination half of `id`. */
  useDestination<T>(id: string, call: (side: QemuDestination) => Promise<T>): Promise<T> {
    const destination = this.#requireDestination(id);
    return this.#contact.during(destinationKey(id), () => call(destination));
  }

  prepareDestination(id: string, spec: VmSpec, plan: MigrationPlan, signal: AbortSignal): Promise<PreparedDestination> {
    return this.#contact.during(destinationKey(id), () => this.#prepareDestination(id, spec, plan, signal));
  }

  async #prepareDestination(id: string, spec: VmSpec, plan: MigrationPlan, signal: AbortSignal): Promise<PreparedDestination> {
    if (this.#destinations.has(id)) throw new VmferryError('VMF_CONFLICT', `migration ${id} is already prepared on ${this.#registry.hostId}`);
    await this.#registry.guard.incoming(spec, plan);
    const destination = new QemuDestination({
      hostId: this.#registry.hostId,
      pool: this.#registry.pool,
      vmDir: (name) => this.#registry.vmDir(name),
      address: this.#address,
      accel: this.#registry.accelerator.accelerator,
      ...(this.#registry.qemuTlsDir === undefined ? {} : { tlsDir: this.#registry.qemuTlsDir }),
      ...(this.#agentPeerName ? { agentPeerName: this.#agentPeerName } : {}),
      ...(this.#registry.fence ? { fence: this.#registry.fence } : {}),
      logger: this.#logger.child({ migration: id }),
    });
    this.#destinations.set(id, destination);
    const preparing = (async () => {
      const vmDir = await this.#registry.makeVmDir(spec.name);
      await writeIncomingRecord(vmDir, { migration: id, phase: 'prepared' });
      return destination.prepare(spec, plan, signal);
    })();
    this.#preparing.set(id, preparing.then(() => undefined, () => undefined).finally(() => this.#preparing.delete(id)));
    return preparing;
  }

  #requireDestination(id: string): QemuDestination {
    const destination = this.#destinations.get(id);
    if (!destination) {
      const settled = this.#settledHere.get(destinationKey(id));
      if (settled) throw new VmferryError('VMF_CONFLICT', settled);
      throw new VmferryError('VMF_NOT_FOUND', `migration ${id} has no destination on ${this.#registry.hostId}`);
    }
    return destination;
  }

  /** What this host holds of migration `id`, for a controller settling it after a restart. */
  describe(id: string): MigrationHalves {
    const source = this.#sources.get(id);
    const deadVm = this.#deadSources.get(id);
    const destination = this.#destinations.get(id);
    return {
      source: source ? { vm: source.vm, settling: source.settling !== undefined } : deadVm !== undefined ? { vm: deadVm, settling: false } : null,
      destination: destination ? { state: destination.state } : null,
    };
  }

  resumeDestination(id: string, signal: AbortSignal): Promise<DestinationResumed> {
    return this.useDestination(id, async (destination) => {
      const vm = destination.vm;
      if (!vm) throw new VmferryError('VMF_CONFLICT', `migration ${id} is not prepared on ${this.#registry.hostId}`);
      const vmDir = this.#registry.vmDir(vm.spec.name);
      // Before the cont can leave: a restarted agent then knows this QEMU may run the guest, and with which spec.
      await writeIncomingRecord(vmDir, { migration: id, phase: 'resume-sent', spec: vm.spec });
      let resumed: DestinationResumed;
      try {
        resumed = await destination.resume(signal);
      } catch (err) {
        // A guest that ran here lives here, even if its QEMU died a moment later: adopted, its disks stay a VM of this host's to start again.
        if ((await destination.fate().catch(() => undefined)) === 'guest-ran') await this.#adoptResumed(id, destination, vm);
        throw err;
      }
      faultPoint('destination-after-cont');
      await faultPointKillsAll('destination-dies-after-cont', vm);
      await this.#adoptResumed(id, destination, vm);
      return resumed;
    });
  }

  async #adoptResumed(id: string, destination: QemuDestination, vm: QemuProcess): Promise<void> {
    await this.#registry.adoptMigrated(vm);
    await writeIncomingRecord(this.#registry.vmDir(vm.spec.name), { migration: id, phase: 'resumed', spec: vm.spec });
    this.#forgetDestination(id);
    this.#rememberEnded(id, 'guest-ran');
    if (destination.inPostcopy) remember(this.#postcopyDestinations, id, destination);
  }

  /** Listens anew for the paused post-copy of `id`, before or after this half resumed; returns the URI. */
  recoverDestinationPostcopy(id: string, signal: AbortSignal): Promise<string> {
    const resumed = this.#postcopyDestinations.get(id);
    if (resumed) return resumed.recoverPostcopy(signal);
    return this.useDestination(id, (destination) => destination.recoverPostcopy(signal));
  }

  /** The guest's resets since the post-copy of `id` resumed it here (DestinationSide.postcopyResets). */
  destinationPostcopyResets(id: string): Promise<GuestReset[]> {
    const resumed = this.#postcopyDestinations.get(id);
    if (!resumed) return Promise.reject(new VmferryError('VMF_NOT_FOUND', `migration ${id} has no post-copy resumed on ${this.#registry.hostId}`));
    return resumed.postcopyResets();
  }

  /** Whether the guest ran here (see no-return.ts); waits for a resume in progress. */
  async destinationFate(id: string): Promise<DestinationFate> {
    const destination = this.#destinations.get(id);
    if (destination) return this.#contact.during(destinationKey(id), () => destination.fate());
    return this.#endedDestinations.get(id) ?? (await this.#registry.incomingFate(id));
  }

  /** An operator chose this host for migration `id`, whose guest may have run here: VmRegistry.takeBackIncoming. */
  async takeBackDestination(id: string): Promise<VmInfo> {
    await this.#preparing.get(id);
    if (this.#destinations.has(id)) {
      throw new VmferryError('VMF_CONFLICT', `the agent on ${this.#registry.hostId} still holds its half of migration ${id} and is finding out whether the guest ran here; vmferry settles it once it says`);
    }
    return this.#registry.takeBackIncoming(id);
  }

  async rollbackDestination(id: string): Promise<void> {
    await this.#preparing.get(id);
    // Idempotent: a rollback of a migration this host never prepared (or already settled) is nothing to do.
    const destination = this.#destinations.get(id);
    if (!destination) {
      await this.#registry.rollbackIncoming(id);
      return;
    }
    await this.#contact.during(destinationKey(id), () => destination.rollback());
    this.#forgetDestination(id);
    this.#rememberEnded(id, 'gone');
  }

  /**
   * Retires the source half of a completed migration. Its local disks are deleted, or, when an operator chose the
   * destination of an unresolved migration (`keepLocalDisks`), kept in this host's quarantine.
   */
  async retireSource(id: string, keepLocalDisks: boolean): Promise<void> {
    const deadVm = this.#deadSources.get(id);
    if (deadVm !== undefined) {
      // The migration completed: the guest runs on the destination, and these disks are an old copy of its.
      const { spec } = await this.#registry.info(deadVm);
      if (keepLocalDisks) await this.#registry.holdRetiredDisks(spec, retiredDisksReason(id, deadVm));
      else await removeLocalCopies(spec);
      await this.#registry.forgetMigrated(deadVm);
      this.#deadSources.delete(id);
      return;
    }
    await this.useSource(id, async (side) => {
      await side.retire(keepLocalDisks);
      const vm = this.#requireSource(id).vm;
      if (keepLocalDisks) await this.#registry.holdRetiredDisks((await this.#registry.info(vm)).spec, retiredDisksReason(id, vm));
      await this.#registry.forgetMigrated(vm);
      this.#forgetSource(id);
    });
  }

  async rollbackSource(id: string): Promise<SourceRolledBack> {
    const deadVm = this.#deadSources.get(id);
    if (deadVm !== undefined) {
      // Nothing to resume: the guest died with its QEMU. The VM stays here, stopped, with its disks.
      this.#registry.setMigrating(deadVm, false);
      await removeOutgoingRecord(this.#registry.vmDir(deadVm));
      this.#deadSources.delete(id);
      return { pauseMs: null };
    }
    let half = this.#sources.get(id);
    if (half?.settling) {
      // Two rollbacks of one QEMU at once would race on its block jobs: the controller's waits for the agent's, and its error.
      await half.settling;
      half = this.#sources.get(id);
    }
    if (!half) return { pauseMs: null };
    return this.#contact.during(sourceKey(id), () => this.#rollBackSource(id, half));
  }

  /** `settledHere` says why, for a controller that asks after the agent settled the half alone; it is recorded before the half is forgotten, so no request sees neither. */
  async #rollBackSource(id: string, half: SourceHalf, settledHere?: string): Promise<SourceRolledBack> {
    try {
      return await half.side.rollback();
    } finally {
      // Even a rollback that failed half-way hands the VM back: its owner must be able to stop or inspect it.
      this.#registry.setMigrating(half.vm, false);
      if (settledHere !== undefined) this.#settledHere.set(sourceKey(id), settledHere);
      this.#forgetSource(id);
      await removeOutgoingRecord(this.#registry.vmDir(half.vm));
    }
  }

  #requireSource(id: string): SourceHalf {
    const half = this.#sources.get(id);
    if (!half) {
      const settled = this.#settledHere.get(sourceKey(id));
      if (settled) throw new VmferryError('VMF_CONFLICT', settled);
      throw new VmferryError('VMF_NOT_FOUND', `migration ${id} has no source on ${this.#registry.hostId}`);
    }
    if (half.settling) throw new VmferryError('VMF_CONFLICT', `the agent on ${this.#registry.hostId} is settling migration ${id} itself: no controller had touched it for ${this.#abandonAfterMs / 1000} s`);
    return half;
  }

  #forgetSource(id: string): void {
    this.#sources.delete(id);
    this.#contact.forget(sourceKey(id));
  }

  #rememberEnded(id: string, fate: DestinationFate): void {
    remember(this.#endedDestinations, id, fate);
  }

  #forgetDestination(id: string): void {
    this.#destinations.delete(id);
    this.#contact.forget(destinationKey(id));
  }

  async #settleAbandoned(): Promise<void> {
    // A sweep that outlasts the interval must not meet the next one on the same half.
    if (this.#sweeping) return;
    this.#sweeping = true;
    try {
      await this.#settleAbandonedHalves();
    } finally {
      this.#sweeping = false;
    }
  }

  async #settleAbandonedHalves(): Promise<void> {
    for (const [id, half] of this.#sources) {
      if (half.settling || this.#contact.idleMs(sourceKey(id)) < this.#abandonAfterMs) continue;
      half.settling = this.#settleAbandonedSource(id, half).finally(() => {
        delete half.settling;
      });
      await half.settling;
    }
    for (const [id, destination] of this.#destinations) {
      if (destination.state === 'prepared' && this.#contact.idleMs(destinationKey(id)) >= this.#abandonAfterMs) await this.#settleAbandonedDestination(id, destination);
    }
  }

  /** Marked settling by its caller before the first await: from then on the controller's requests are refused, so none can continue the migration under us. */
  async #settleAbandonedSource(id: string, half: SourceHalf): Promise<void> {
    const silentFor = `no controller had touched it for ${Math.round(this.#contact.idleMs(sourceKey(id)) / 1000)} s`;
    const { status } = await half.side.migrationInfo(timeoutSignal(`reading migration ${id} on its source`, 10_000));
    // The source cannot ask the destination: past pre-switchover a resume may have been sent, and only the controller settles that.
    const phase: MigrationPhase = sourceSafeToRollBack.includes(status) ? 'migrating' : 'resume-sent';
    if (settlement(phase, undefined) !== 'roll-back') {
      this.#warnOnce(sourceKey(id), `migration ${id} of ${half.vm} is "${status}" on its source and ${silentFor}; only the controller can settle it now (start it again)`);
      return;
    }
    this.#logger.warn({ migration: id, vm: half.vm, status }, `rolling back the source half of migration ${id}: ${silentFor}`);
    await this.#rollBackSource(id, half, `the agent on ${this.#registry.hostId} rolled back its half of migration ${id} (${silentFor}): ${half.vm} runs here`);
  }

  /**
   * Only a destination whose QEMU is gone: the controller does not poll the
   * destination while the mirrors and RAM move, so silence says nothing there.
   * Its QEMU exits by itself when the source cancels (a rollback, or the
   * source's agent settling alone), and then nothing of the guest is here.
   */
  async #settleAbandonedDestination(id: string, destination: QemuDestination): Promise<void> {
    if (destination.vm?.isAlive === true) return;
    this.#logger.warn({ migration: id }, `removing the destination half of migration ${id}: its QEMU has exited and no controller has touched it since`);
    await this.#contact.during(destinationKey(id), () => destination.rollback());
    this.#forgetDestination(id);
    this.#settledHere.set(destinationKey(id), `the agent on ${this.#registry.hostId} removed its half of migration ${id} after its QEMU exited`);
  }

  #warnOnce(key: string, message: string): void {
    if (this.#warned.has(key)) return;
    this.#warned.add(key);
    this.#logger.error(message);
  }
}

const maxEndedDestinations = 4096;

/** Adds to a map of ended halves, dropping the oldest beyond maxEndedDestinations. */
function remember<T>(map: Map<string, T>, id: string, value: T): void {
  map.set(id, value);
  const oldest = map.keys().next().value;
  if (map.size > maxEndedDestinations && oldest !== undefined) map.delete(oldest);
}

function sourceKey(id: string): string {
  return `source:${id}`;
}

function destinationKey(id: string): string {
  return `destination:${id}`;
}

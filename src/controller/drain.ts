/**
 * Host drain: every running VM of a host moves elsewhere, up to `parallel`
 * migrations at once within one bandwidth budget. The host is marked draining
 * first (nothing new is placed there); each VM's destination is the candidate
 * the planner accepts (memory, pool, shared volumes reachable, CPU) with the
 * most free memory left after what this drain already sends there. The budget
 * is split evenly among the migrations running, and re-split as each starts
 * (the others lowered first) and ends, through the source agents' mirror
 * speed and RAM max-bandwidth.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import { RemoteSource } from '../agent/client.ts';
import type { VmInfo } from '../api/agent-types.ts';
import { finalPhases, type MigrationReport } from '../migration/phases.ts';
import { defaultMigrationOptions, planMigration } from '../migration/plan.ts';
import type { Inventory } from './inventory.ts';
import type { MigrationService } from './migrations.ts';
import type { DrainedVm, DrainStatus, Store } from '../store/store.ts';
import type { MigrationChanges } from './events.ts';
import { setTimeout as sleep } from 'node:timers/promises';

const MiB = 1024 * 1024;
/** Drains `list` returns at most. */
const drainsListed = 100;
/** How often the drain looks at its running migrations. */
const pollMs = 500;

export interface DrainRequest {
  host: string;
  /** The hosts VMs may go to; default every reachable host that is not draining. */
  to?: string[] | undefined;
  parallel: number;
  /** The budget all of its migrations share, MiB/s; none: each runs uncapped. */
  bandwidthMiBs?: number | undefined;
}

export type { DrainedVm, DrainStatus } from '../store/store.ts';

/** Bytes a completed or failed migration sent: RAM and every mirror. */
function sentBytes(report: MigrationReport): number {
  return report.ram.transferredBytes + report.disks.reduce((sum, d) => sum + d.bytesSent, 0);
}

/** From the first phase that moves data to the resume (or the end): when this migration was sending. */
function transferWindow(report: MigrationReport): { from: number; until: number } | undefined {
  const start = report.phases.find((p) => p.phase === 'mirroring' || p.phase === 'migrating' || p.phase === 'stopping');
  if (!start) return undefined;
  const end = report.phases.find((p) => p.startedAt >= start.startedAt && (p.phase === 'resume-sent' || p.phase === 'rolling-back'));
  const last = report.phases.at(-1);
  return { from: start.startedAt, until: end?.startedAt ?? (last ? last.startedAt + last.durationMs : start.startedAt) };
}

/** The length of the union of the windows. */
function unionMs(windows: { from: number; until: number }[]): number {
  let total = 0;
  let reach = -Infinity;
  for (const w of [...windows].sort((a, b) => a.from - b.from)) {
    const from = Math.max(w.from, reach);
    if (w.until > from) total += w.until - from;
    reach = Math.max(reach, w.until);
  }
  return total;
}

export class DrainService {
  readonly #store: Store;
  readonly #inventory: Inventory;
  readonly #migrations: Pick<MigrationService, 'start' | 'get'>;
  readonly #logger: Logger;
  readonly #changes: Pick<MigrationChanges, 'drainChanged'> | undefined;
  readonly #drains = new Map<string, { status: DrainStatus; stop: AbortController; done: Promise<void> }>();

  /** `changes` hears of each change of a drain's status, for the live streams (the dashboard's drain view). */
  constructor(store: Store, inventory: Inventory, migrations: Pick<MigrationService, 'start' | 'get'>, logger: Logger, changes?: Pick<MigrationChanges, 'drainChanged'>) {
    this.#store = store;
    this.#inventory = inventory;
    this.#migrations = migrations;
    this.#logger = logger;
    this.#changes = changes;
  }

  /** Marks the host draining and starts moving its VMs; returns at once with the drain's status. */
  async start(request: DrainRequest): Promise<DrainStatus> {
    const hosts = await this.#inventory.hosts();
    const known = (id: string): void => {
      if (!hosts.some((h) => h.id === id)) throw new VmferryError('VMF_NOT_FOUND', `no host named ${id} (known: ${hosts.map((h) => h.id).join(', ') || 'none'})`);
    };
    known(request.host);
    for (const id of request.to ?? []) known(id);
    if (request.to?.includes(request.host)) throw new VmferryError('VMF_INVALID_ARGUMENT', `--to names ${request.host}, the host being drained`);
    const running = [...this.#drains.values()].find((d) => d.status.host === request.host && d.status.state === 'running');
    if (running) throw new VmferryError('VMF_CONFLICT', `host ${request.host} is already being drained (${running.status.id})`);
    await this.#store.setHostDraining(request.host, true);
    const vms = (await this.#inventory.vms()).filter((v) => v.host === request.host && !v.migrating);
    const status: DrainStatus = {
      id: randomUUID(),
      host: request.host,
      to: request.to ?? null,
      parallel: request.parallel,
      bandwidthMiBs: request.bandwidthMiBs ?? null,
      state: 'running',
      startedAt: Date.now(),
      endedAt: null,
      // The largest first: while every candidate still has room.
      vms: vms
        .sort((a, b) => b.spec.memoryMiB - a.spec.memoryMiB)
        .map((v): DrainedVm => (v.state === 'running' ? { vm: v.name, state: 'waiting' } : { vm: v.name, state: 'skipped', reason: `${v.state}: only a running VM migrates live` })),
      transfer: null,
    };
    const stop = new AbortController();
    const logger = this.#logger.child({ drain: status.id, host: request.host });
    const done = this.#run(status, new Map(vms.map((v) => [v.name, v])), stop.signal, logger).catch((err: unknown) => {
      logger.error({ err: describeError(err) }, 'drain crashed');
    });
    this.#drains.set(status.id, { status, stop, done });
    await this.#store.saveDrain(status);
    this.#changes?.drainChanged(status.id);
    logger.info({ vms: status.vms.length, parallel: request.parallel, bandwidthMiBs: request.bandwidthMiBs }, 'drain started');
    return structuredClone(status);
  }

  get(id: string): DrainStatus {
    const drain = this.#drains.get(id);
    if (!drain) throw new VmferryError('VMF_NOT_FOUND', `no drain ${id}`);
    return structuredClone(drain.status);
  }

  list(): DrainStatus[] {
    return [...this.#drains.values()].map((d) => structuredClone(d.status));
  }

  /** A drain as it runs here, or as the store kept it (ended, or run by a controller that has stopped since). */
  async find(id: string): Promise<DrainStatus> {
    const drain = this.#drains.get(id);
    if (drain) return structuredClone(drain.status);
    const stored = await this.#store.getDrain(id);
    if (!stored) throw new VmferryError('VMF_NOT_FOUND', `no drain ${id}`);
    return this.#orphaned(stored);
  }

  /** Newest first: the drains running here and those the store kept. */
  async history(): Promise<DrainStatus[]> {
    const stored = await this.#store.listDrains(drainsListed);
    const all = [...this.list(), ...stored.filter((d) => !this.#drains.has(d.id)).map((d) => this.#orphaned(d))];
    return all.sort((a, b) => b.startedAt - a.startedAt);
  }

  /** A stored drain no controller runs now: its controller stopped; its migrations were settled as any other (recovery.ts). */
  #orphaned(drain: DrainStatus): DrainStatus {
    return drain.state === 'running' ? { ...drain, state: 'stopped' } : drain;
  }

  /** The host takes VMs again; a drain of it still running starts no more migrations (those running finish). */
  async undrain(host: string): Promise<void> {
    const hosts = await this.#inventory.hosts();
    if (!hosts.some((h) => h.id === host)) throw new VmferryError('VMF_NOT_FOUND', `no host named ${host} (known: ${hosts.map((h) => h.id).join(', ') || 'none'})`);
    for (const drain of this.#drains.values()) if (drain.status.host === host) drain.stop.abort();
    await this.#store.setHostDraining(host, false);
  }

  /** On shutdown: no new migrations; the running ones are the migration service's to settle. */
  async close(): Promise<void> {
    for (const drain of this.#drains.values()) drain.stop.abort();
    await Promise.all([...this.#drains.values()].map((d) => d.done));
  }

  async #run(status: DrainStatus, infos: Map<string, VmInfo>, stop: AbortSignal, logger: Logger): Promise<void> {
    let announced = JSON.stringify(status);
    let saving = Promise.resolve();
    const announce = (): void => {
      const now = JSON.stringify(status);
      if (now === announced) return;
      announced = now;
      // Stored as it changes, in order, so its status and its VMs' outcomes outlive this controller.
      const snapshot = structuredClone(status);
      saving = saving.then(() => this.#store.saveDrain(snapshot)).catch((err: unknown) => logger.warn({ err: describeError(err) }, 'could not store the drain'));
      this.#changes?.drainChanged(status.id);
    };
    const budgetBytes = status.bandwidthMiBs === null ? undefined : status.bandwidthMiBs * MiB;
    const running: DrainedVm[] = [];
    const shareFor = (count: number): number | undefined => (budgetBytes === undefined ? undefined : Math.max(1, Math.floor(budgetBytes / count)));
    const rebalance = async (share: number | undefined): Promise<void> => {
      if (share === undefined) return;
      await Promise.all(running.map((entry) => this.#setShare(entry, share, logger)));
    };
    try {
      for (;;) {
        while (!stop.aborted && running.length < status.parallel) {
          const next = status.vms.find((v) => v.state === 'waiting');
          if (!next) break;
          const info = infos.get(next.vm);
          if (!info) throw new Error(`drain lost track of ${next.vm}`);
          const share = shareFor(running.length + 1);
          // Lowered before the new one starts: the sum never exceeds the budget.
          await rebalance(share);
          // A running migration's memory is not yet counted in its destination's free memory.
          const incoming = (host: string): number => running.filter((r) => r.to === host).reduce((sum, r) => sum + (infos.get(r.vm)?.spec.memoryMiB ?? 0), 0);
          await this.#startOne(status, next, info, incoming, share, logger);
          if (next.state === 'migrating') running.push(next);
          announce();
        }
        if (running.length === 0) break;
        await sleep(pollMs);
        let ended = false;
        for (const entry of [...running]) {
          if (!(await this.#refresh(entry, logger))) continue;
          running.splice(running.indexOf(entry), 1);
          ended = true;
        }
        announce();
        if (ended) await rebalance(shareFor(Math.max(1, running.length)));
      }
    } finally {
      status.state = stop.aborted ? 'stopped' : 'done';
      status.endedAt = Date.now();
      const reported = status.vms.filter((v) => v.sentBytes !== undefined);
      const busyMs = unionMs(reported.flatMap((v) => (v.transfer ? [v.transfer] : [])));
      const bytes = reported.reduce((sum, v) => sum + (v.sentBytes ?? 0), 0);
      status.transfer = { bytes, busyMs, bytesPerSecond: busyMs > 0 ? Math.round((bytes * 1000) / busyMs) : 0 };
      announce();
      await saving;
      logger.info({ state: status.state, transfer: status.transfer }, 'drain ended');
    }
  }

  async #startOne(status: DrainStatus, entry: DrainedVm, info: VmInfo, incoming: (host: string) => number, share: number | undefined, logger: Logger): Promise<void> {
    try {
      const to = await this.#chooseDestination(status, info, incoming);
      entry.to = to;
      const { id } = await this.#migrations.start({ vm: entry.vm, to, dryRun: false, options: share === undefined ? {} : { bandwidthMiBs: share / MiB } });
      if (!id) throw new Error('the migration service started no migration');
      entry.migrationId = id;
      entry.state = 'migrating';
      entry.phase = 'pending';
      if (share !== undefined) entry.shareBytes = share;
      logger.info({ vm: entry.vm, to, migration: id, shareBytes: share }, 'drain migration started');
    } catch (err) {
      entry.state = 'failed';
      entry.reason = describeError(err);
      logger.warn({ vm: entry.vm, err: entry.reason }, 'drain could not start a migration');
    }
  }

  /**
   * The candidate whose planner accepts the VM, with the most free memory once
   * this drain's migrations running to it are counted; refused everywhere: an
   * error naming each candidate's reasons.
   */
  async #chooseDestination(status: DrainStatus, info: VmInfo, incoming: (host: string) => number): Promise<string> {
    const hosts = await this.#inventory.hosts();
    const candidates = (status.to ?? hosts.filter((h) => h.id !== status.host && h.state === 'reachable' && !h.draining).map((h) => h.id)).filter(
      (id) => !hosts.find((h) => h.id === id)?.draining,
    );
    if (candidates.length === 0) throw new VmferryError('VMF_MIGRATION_REFUSED', `no host to move ${info.name} to: every other host is draining or unreachable`);
    const sourceFacts = await (await this.#inventory.agent(status.host)).probeSource(info.name);
    const reasons: string[] = [];
    let best: { id: string; roomMiB: number } | undefined;
    for (const id of candidates) {
      try {
        const facts = await (await this.#inventory.agent(id)).probeDestination(info.spec);
        const plan = planMigration(info.spec, sourceFacts, facts, defaultMigrationOptions);
        if (plan.refusals.length) {
          reasons.push(`${id}: ${plan.refusals.join('; ')}`);
          continue;
        }
        const incomingMiB = incoming(id);
        const roomMiB = facts.freeMemoryMiB - incomingMiB - info.spec.memoryMiB;
        if (roomMiB < 0) {
          reasons.push(`${id}: ${facts.freeMemoryMiB} MiB free, ${incomingMiB} MiB already on its way there by this drain`);
          continue;
        }
        if (!best || roomMiB > best.roomMiB) best = { id, roomMiB };
      } catch (err) {
        reasons.push(`${id}: ${describeError(err)}`);
      }
    }
    if (!best) throw new VmferryError('VMF_MIGRATION_REFUSED', `no host takes ${info.name}: ${reasons.join(' | ')}`);
    return best.id;
  }

  async #setShare(entry: DrainedVm, share: number, logger: Logger): Promise<void> {
    if (!entry.migrationId || entry.shareBytes === share) return;
    try {
      const record = await this.#migrations.get(entry.migrationId);
      const source = new RemoteSource(record.from, await this.#inventory.agent(record.from), entry.migrationId);
      await source.setBandwidth(share, AbortSignal.timeout(15_000));
      entry.shareBytes = share;
    } catch (err) {
      // A migration past its transfer (retiring, or just ended) has no cap to change.
      logger.debug({ vm: entry.vm, err: describeError(err) }, 'could not change the bandwidth share');
    }
  }

  /** Reads the migration's record; true once it has ended for the drain (a final phase, or unresolved). */
  async #refresh(entry: DrainedVm, logger: Logger): Promise<boolean> {
    if (!entry.migrationId) return true;
    const record = await this.#migrations.get(entry.migrationId).catch((err: unknown) => {
      logger.warn({ vm: entry.vm, err: describeError(err) }, 'could not read the migration record');
      return undefined;
    });
    if (!record) return false;
    entry.phase = record.phase;
    const ended = finalPhases.includes(record.phase) || record.phase === 'unresolved';
    if (!ended || !record.report) return false;
    const report = record.report;
    entry.state = report.outcome;
    if (report.error) entry.reason = report.error.message;
    entry.sentBytes = sentBytes(report);
    entry.totalMs = report.totalMs;
    entry.downtimeMs = report.downtimeMs ?? null;
    const window = transferWindow(report);
    if (window) entry.transfer = window;
    delete entry.shareBytes;
    logger.info({ vm: entry.vm, outcome: report.outcome }, 'drain migration ended');
    return true;
  }
}

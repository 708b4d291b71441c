/**
 * Drives migrations through the two agents: plans with facts probed from both
 * hosts, refuses a second migration of the same VM, runs the executor over
 * remote sides, and records every event and the final report.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import { RemoteDestination, RemoteSource } from '../agent/client.ts';
import { runMigration } from '../migration/executor.ts';
import { finalPhases, type MigrationEvent, type MigrationPhase, type MigrationReport } from '../migration/phases.ts';
import { defaultMigrationOptions, planMigration, withRamMode, type MigrationOptions, type MigrationPlan } from '../migration/plan.ts';
import type { MigrationRecord, Store } from '../store/store.ts';
import { runAttempts } from './attempts.ts';
import { retireUntilDone, settleUntilDone } from './recovery.ts';
import { StorageIoWatch, type StorageServerAccess } from './storage-io.ts';
import type { Inventory } from './inventory.ts';

export interface MigrationRequest {
  vm: string;
  to: string;
  options: Partial<MigrationOptions>;
  dryRun: boolean;
}

export class MigrationService {
  readonly #store: Store;
  readonly #inventory: Inventory;
  readonly #logger: Logger;
  readonly #storage: StorageServerAccess | undefined;
  readonly #running = new Map<string, { abort: AbortController; done: Promise<void> }>();
  /** Ends the loops that keep asking about unresolved migrations, on shutdown. */
  readonly #stopping = new AbortController();

  constructor(store: Store, inventory: Inventory, logger: Logger, storage?: StorageServerAccess) {
    this.#store = store;
    this.#inventory = inventory;
    this.#logger = logger;
    this.#storage = storage;
  }

  /** Plans the migration; unless a dry run, starts it and returns its id. */
  async start(request: MigrationRequest): Promise<{ plan: MigrationPlan; id?: string }> {
    const active = await this.#store.activeMigration(request.vm);
    if (active) throw new VmferryError('VMF_CONFLICT', `VM ${request.vm} is already migrating (${active.id}, ${active.from} → ${active.to}, ${active.phase})`);
    await this.#inventory.refuseDraining(request.to, `migrating ${request.vm} to it is`);
    const from = await this.#inventory.locateVm(request.vm);
    const sourceAgent = await this.#inventory.agent(from);
    const destinationAgent = await this.#inventory.agent(request.to);
    const vm = await sourceAgent.getVm(request.vm);
    if (vm.state !== 'running') throw new VmferryError('VMF_CONFLICT', `VM ${request.vm} is ${vm.state} on ${from}; only a running VM migrates live`);
    const [sourceFacts, destinationFacts] = await Promise.all([sourceAgent.probeSource(request.vm), destinationAgent.probeDestination(vm.spec)]);
    const plan = planMigration(vm.spec, sourceFacts, destinationFacts, { ...defaultMigrationOptions, ...request.options });
    if (request.dryRun) return { plan };
    if (plan.refusals.length) {
      throw new VmferryError('VMF_MIGRATION_REFUSED', `migration of ${request.vm} to ${request.to} refused: ${plan.refusals.join('; ')}`);
    }

    const id = randomUUID();
    const now = Date.now();
    await this.#store.createMigration({ id, vm: request.vm, from, to: request.to, phase: 'pending', plan, report: null, createdAt: now, updatedAt: now });
    const source = new RemoteSource(from, sourceAgent, id);
    const destination = new RemoteDestination(request.to, destinationAgent, id);
    const abort = new AbortController();
    const logger = this.#logger.child({ migration: id, vm: request.vm });
    try {
      await source.begin(plan);
    } catch (err) {
      // The agent may have bound the half and only its reply was lost: let go of it, or the VM stays "migrating" there.
      await source.rollback().catch((rollbackErr: unknown) => logger.warn({ err: describeError(rollbackErr) }, `could not release the source half on ${from}; its agent does after --abandon-after`));
      await this.#store.updateMigration(id, { phase: 'failed' });
      throw err;
    }
    const onEvent = (event: MigrationEvent): void => {
      this.#store.appendEvent(id, event).catch((err: unknown) => logger.error({ err: describeError(err) }, 'could not store event'));
    };
    // Awaited before each step acts: a controller that restarts settles the migration from it (recovery.ts).
    const recordPhase = (phase: MigrationPhase): Promise<void> => this.#store.updateMigration(id, { phase });
    const attempts = async (): Promise<MigrationReport> => {
      // A re-attached disk has no copy job: the storage server's counters, before and after, say what crossed for it.
      const storageIo = await StorageIoWatch.start(this.#storage, vm.spec, plan, logger);
      const report = await runAttempts({
        run: (attemptEvent, ramMode) =>
          runMigration({ spec: vm.spec, plan: withRamMode(plan, ramMode), source, destination, signal: abort.signal, logger, onEvent: attemptEvent, recordPhase }),
        ramMode: plan.ram.mode,
        fallback: plan.options.fallback,
        beforeRetry: () => source.begin(plan),
        onEvent,
        signal: abort.signal,
      });
      // The executor stored `unresolved` as it entered it: its reason must not wait on the storage server's counters.
      // (A final phase is stored once, with the full report, below: whoever sees it final reads the whole report.)
      if (report.outcome === 'unresolved') await this.#store.updateMigration(id, { phase: 'unresolved', report });
      return storageIo.finish(report);
    };
    const done = attempts()
      .then(async (report) => {
        await this.#store.updateMigration(id, { phase: report.phases.at(-1)?.phase ?? 'failed', report });
        if (report.outcome === 'completed') await this.#store.setVmLocation({ name: request.vm, hostId: request.to });
        // The guest runs on the destination, but the source's QEMU sits paused there until it retires.
        if (report.outcome === 'completed' && !report.phases.some((p) => p.phase === 'source-retired')) {
          const record = await this.#store.getMigration(id);
          if (record) await retireUntilDone(record, this.#inventory, logger, this.#stopping.signal);
        }
        // The source stays paused until the destination says whether its guest ran: keep asking.
        if (report.outcome === 'unresolved') await settleUntilDone(id, this.#store, this.#inventory, logger, this.#stopping.signal, 'a fault came');
      })
      .catch(async (err: unknown) => {
        logger.error({ err: describeError(err) }, 'migration crashed');
        await this.#store.updateMigration(id, { phase: 'failed' });
      })
      .finally(() => this.#running.delete(id));
    this.#running.set(id, { abort, done });
    return { plan, id };
  }

  /** Cancels a running migration; cancelling a finished one is a no-op that returns its record. */
  async cancel(id: string): Promise<MigrationRecord> {
    const record = await this.get(id);
    this.#running.get(id)?.abort.abort();
    return record;
  }

  async get(id: string): Promise<MigrationRecord> {
    const record = await this.#store.getMigration(id);
    if (!record) throw new VmferryError('VMF_NOT_FOUND', `no migration ${id}`);
    return record;
  }

  list(): Promise<MigrationRecord[]> {
    return this.#store.listMigrations(100);
  }

  isFinal(record: MigrationRecord): boolean {
    return finalPhases.includes(record.phase);
  }

  /** Waits for running migrations to settle (on shutdown, after cancelling them). */
  async drain(): Promise<void> {
    this.#stopping.abort();
    for (const { abort } of this.#running.values()) abort.abort(new VmferryError('VMF_ABORTED', 'the controller is shutting down'));
    await Promise.all([...this.#running.values()].map((r) => r.done));
  }
}

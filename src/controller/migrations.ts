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
import { capOf, predictMigration } from '../migration/prediction.ts';
import { retireUntilDone, settleUntilDone } from './recovery.ts';
import { resolveMigration, type ResolvingHalves } from './resolve.ts';
import { faultPoint } from '../util/fault-points.ts';
import { StorageIoWatch, type StorageServerAccess } from './storage-io.ts';
import type { Inventory } from './inventory.ts';

export interface MigrationRequest {
  vm: string;
  to: string;
  options: Partial<MigrationOptions>;
  dryRun: boolean;
}

/** What a tenure as leader acts with (src/controller/tenure.ts): writes and agent requests refused once it is over. */
export interface Tenancy {
  store: Store;
  inventory: Inventory;
  /** Aborts when the tenure ends: its migrations stop without another write or request. */
  signal: AbortSignal;
}

export class MigrationService {
  /** For reads: any controller answers them. */
  readonly #store: Store;
  readonly #logger: Logger;
  readonly #storage: StorageServerAccess | undefined;
  readonly #running = new Map<string, { abort: AbortController; done: Promise<void> }>();
  /** Ends the loops that keep asking about unresolved migrations, on shutdown. */
  readonly #stopping = new AbortController();
  #tenancy: Tenancy | undefined;

  constructor(store: Store, logger: Logger, storage?: StorageServerAccess) {
    this.#store = store;
    this.#logger = logger;
    this.#storage = storage;
  }

  /** From now on, migrations start under `tenancy`. */
  lead(tenancy: Tenancy): void {
    this.#tenancy = tenancy;
  }

  /** Resolves once no migration of this controller is running (a tenure that ended waits for its own to stop). */
  async idle(): Promise<void> {
    await Promise.all([...this.#running.values()].map((r) => r.done));
  }

  /** Plans the migration; unless a dry run, starts it and returns its id. */
  async start(request: MigrationRequest): Promise<{ plan: MigrationPlan; id?: string }> {
    const tenancy = this.#tenancy;
    if (!tenancy || tenancy.signal.aborted) throw new VmferryError('VMF_NOT_LEADER', 'this controller does not lead (yet): it takes migrations once it has settled those a previous leader left');
    const { store, inventory } = tenancy;
    const active = await store.activeMigration(request.vm);
    if (active) throw new VmferryError('VMF_CONFLICT', `VM ${request.vm} is already migrating (${active.id}, ${active.from} → ${active.to}, ${active.phase})`);
    await inventory.refuseDraining(request.to, `migrating ${request.vm} to it is`);
    const from = await inventory.locateVm(request.vm);
    const sourceAgent = await inventory.agent(from);
    const destinationAgent = await inventory.agent(request.to);
    const vm = await sourceAgent.getVm(request.vm);
    if (vm.state !== 'running') throw new VmferryError('VMF_CONFLICT', `VM ${request.vm} is ${vm.state} on ${from}; only a running VM migrates live`);
    // A real migration without a cap is not measured: with no link figure nothing is predicted but the dirty rate,
    // and QEMU's measurement would add its second to the migration's start.
    const predicted = request.dryRun === true || request.options?.bandwidthMiBs !== undefined;
    const [sourceFacts, destinationFacts, ramFacts] = await Promise.all([
      sourceAgent.probeSource(request.vm),
      destinationAgent.probeDestination(vm.spec),
      // The plan stands without a prediction: a measurement that fails only leaves it out, and says why.
      predicted ? sourceAgent.measureGuestRam(request.vm).catch((err: unknown) => describeError(err)) : undefined,
    ]);
    const planned = planMigration(vm.spec, sourceFacts, destinationFacts, { ...defaultMigrationOptions, ...request.options });
    const plan = typeof ramFacts === 'object' ? { ...planned, prediction: predictMigration(planned, ramFacts, capOf(planned)) } : planned;
    if (typeof ramFacts === 'string') this.#logger.warn({ vm: request.vm }, `no prediction for the migration of ${request.vm}: its dirty rate was not measured (${ramFacts})`);
    if (request.dryRun) return { plan };
    if (plan.refusals.length) {
      throw new VmferryError('VMF_MIGRATION_REFUSED', `migration of ${request.vm} to ${request.to} refused: ${plan.refusals.join('; ')}`);
    }

    const id = randomUUID();
    const now = Date.now();
    await store.createMigration({ id, vm: request.vm, from, to: request.to, phase: 'pending', plan, report: null, createdAt: now, updatedAt: now });
    const source = new RemoteSource(from, sourceAgent, id);
    const destination = new RemoteDestination(request.to, destinationAgent, id);
    const abort = new AbortController();
    // Cancelled by the user, or stopped by the end of the tenure.
    const signal = AbortSignal.any([abort.signal, tenancy.signal]);
    const loops = AbortSignal.any([this.#stopping.signal, tenancy.signal]);
    const logger = this.#logger.child({ migration: id, vm: request.vm });
    try {
      await source.begin(plan);
    } catch (err) {
      // The agent may have bound the half and only its reply was lost: let go of it, or the VM stays "migrating" there.
      await source.rollback().catch((rollbackErr: unknown) => logger.warn({ err: describeError(rollbackErr) }, `could not release the source half on ${from}; its agent does after --abandon-after`));
      await store.updateMigration(id, { phase: 'failed' });
      throw err;
    }
    const onEvent = (event: MigrationEvent): void => {
      store.appendEvent(id, event).catch((err: unknown) => logger.error({ err: describeError(err) }, 'could not store event'));
    };
    // Awaited before each step acts: a controller that restarts settles the migration from it (recovery.ts).
    const recordPhase = async (phase: MigrationPhase): Promise<void> => {
      await store.updateMigration(id, { phase });
      if (phase === 'paused-at-switchover') faultPoint('controller-at-switchover');
      if (phase === 'resumed') faultPoint('controller-after-resume');
    };
    const attempts = async (): Promise<MigrationReport> => {
      // A re-attached disk has no copy job: the storage server's counters, before and after, say what crossed for it.
      const storageIo = await StorageIoWatch.start(this.#storage, vm.spec, plan, logger);
      const report = await runAttempts({
        run: (attemptEvent, ramMode) =>
          runMigration({ spec: vm.spec, plan: withRamMode(plan, ramMode), source, destination, signal, logger, onEvent: attemptEvent, recordPhase }),
        ramMode: plan.ram.mode,
        fallback: plan.options.fallback,
        beforeRetry: () => source.begin(plan),
        onEvent,
        signal,
      });
      // The executor stored `unresolved` as it entered it: its reason must not wait on the storage server's counters.
      // (A final phase is stored once, with the full report, below: whoever sees it final reads the whole report.)
      if (report.outcome === 'unresolved') await store.updateMigration(id, { phase: 'unresolved', report });
      const finished = await storageIo.finish(report);
      return plan.prediction ? { ...finished, prediction: plan.prediction } : finished;
    };
    const done = attempts()
      .then(async (report) => {
        await store.updateMigration(id, { phase: report.phases.at(-1)?.phase ?? 'failed', report });
        if (report.outcome === 'completed') await store.setVmLocation({ name: request.vm, hostId: request.to });
        // The guest runs on the destination, but the source's QEMU sits paused there until it retires.
        if (report.outcome === 'completed' && !report.phases.some((p) => p.phase === 'source-retired')) {
          const record = await store.getMigration(id);
          if (record) await retireUntilDone(record, inventory, logger, loops);
        }
        // The source stays paused until the destination says whether its guest ran: keep asking.
        if (report.outcome === 'unresolved') await settleUntilDone(id, store, inventory, logger, loops, 'a fault came');
      })
      .catch(async (err: unknown) => {
        if (tenancy.signal.aborted) {
          logger.warn({ err: describeError(err) }, 'migration left to the new leader: this controller lost the leader lease');
          return;
        }
        // Its outcome is not known here: the final write itself may be what failed (the database restarting) after the
        // guest moved to the destination. Stored as failed it would be placed back on the source; settled by the rules
        // of recovery, the stored phase and the hosts' word decide, once the database answers again.
        logger.error({ err: describeError(err) }, 'migration crashed; settling it as a restarted controller would');
        await settleUntilDone(id, store, inventory, logger, loops, `its controller could not finish it (${describeError(err)})`);
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

  /** An operator's choice of the host an unresolved migration's guest runs on (resolve.ts). */
  async resolve(id: string, runOn: string): Promise<MigrationRecord> {
    const record = await this.get(id);
    const tenancy = this.#tenancy;
    if (!tenancy || tenancy.signal.aborted) throw new VmferryError('VMF_NOT_LEADER', 'this controller does not lead (yet): the leader settles migrations');
    const { inventory } = tenancy;
    const [sourceAgent, destinationAgent] = await Promise.all([inventory.agent(record.from), inventory.agent(record.to)]);
    const source = new RemoteSource(record.from, sourceAgent, id);
    const halves: ResolvingHalves = {
      source: {
        hostId: record.from,
        retire: (keep) => source.retire(keep),
        rollback: () => source.rollback(),
        localDisks: async () => (await sourceAgent.getVm(record.vm)).spec.disks.flatMap((d) => (d.source.kind === 'file' ? [d.source.path] : [])),
      },
      destination: new RemoteDestination(record.to, destinationAgent, id),
    };
    return resolveMigration(record, runOn, tenancy.store, halves, this.#logger.child({ migration: id, vm: record.vm }));
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

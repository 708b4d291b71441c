/**
 * Settles migrations no executor is driving any more: those a previous
 * controller process left unfinished, and those that ended `unresolved`
 * (the destination could not say whether its guest ran). The stored phase and
 * the destination's word decide, by the one rule of no-return.ts: before a
 * resume was sent, roll back (destination first); after it, finish if the
 * guest ran on the destination, roll back if the destination confirms its
 * QEMU never ran it and is gone, and otherwise keep the source paused and ask
 * again. Never two running copies, never none.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { RemoteDestination, RemoteSource } from '../agent/client.ts';
import { describeError, hasCode } from '../errors.ts';
import { cannotTell, postcopyMayHaveBegun, resumeMayHaveBeenSent, settlement, type DestinationFate, type PostcopyRam } from '../migration/no-return.ts';
import type { MigrationPhase, MigrationReport } from '../migration/phases.ts';
import type { DestinationSide, SourceSide } from '../migration/sides.ts';
import type { MigrationRecord, Store } from '../store/store.ts';
import type { Inventory } from './inventory.ts';
import { timeoutSignal } from '../util/abort.ts';

/** What settling a migration asks of its two halves: the agents' (RemoteSource, RemoteDestination), or a test's. */
export interface SettlingHalves {
  source: Pick<SourceSide, 'hostId' | 'migrationInfo' | 'retire' | 'rollback'>;
  destination: Pick<DestinationSide, 'hostId' | 'fate' | 'resume' | 'rollback'>;
}

/** The halves of a migration on its hosts' agents. */
async function agentHalves(record: MigrationRecord, inventory: Inventory): Promise<SettlingHalves> {
  return {
    source: new RemoteSource(record.from, await inventory.agent(record.from), record.id),
    destination: new RemoteDestination(record.to, await inventory.agent(record.to), record.id),
  };
}

/** Between two attempts to settle a migration whose hosts do not answer yet (restarting, cut off). */
const retryGapMs = 2_000;
/** The destination first waits for a resume still in progress before it answers. */
const fateTimeoutMs = 90_000;
/** As the executor's: a few QMP commands and a lease grant. */
const resumeTimeoutMs = 60_000;

/**
 * Never rejects: a migration it cannot settle is logged and retried until `signal` aborts. `why` goes into each
 * settled migration's report. A database that does not answer (restarting) is asked again too: giving up would
 * leave those migrations unfinished, and their VMs refused any new migration, until the next tenure.
 */
export async function settleUnfinishedMigrations(
  store: Store,
  inventory: Inventory,
  logger: Logger,
  signal: AbortSignal,
  why = 'the controller restarted',
  halves: (record: MigrationRecord) => Promise<SettlingHalves> = (record) => agentHalves(record, inventory),
): Promise<void> {
  let unfinished: MigrationRecord[] | undefined;
  let lastProblem = '';
  while (!unfinished && !signal.aborted) {
    try {
      unfinished = await store.unfinishedMigrations();
    } catch (err) {
      const problem = describeError(err);
      if (problem !== lastProblem) logger.error({ err: problem }, `could not read unfinished migrations yet; asking again every ${retryGapMs / 1000} s`);
      lastProblem = problem;
      await sleep(retryGapMs, undefined, { signal }).catch(() => undefined);
    }
  }
  await Promise.all((unfinished ?? []).map((record) => settleUntilDone(record.id, store, inventory, logger, signal, why, halves)));
}

/**
 * Settles one migration, asking again every few seconds while a host does not
 * answer; resolves once it is completed or failed, once its destination says
 * that it cannot tell whether the guest ran there (then only an operator
 * settles it: resolve.ts), or when `signal` aborts.
 */
export async function settleUntilDone(
  id: string,
  store: Store,
  inventory: Inventory,
  logger: Logger,
  signal: AbortSignal,
  why: string,
  halves: (record: MigrationRecord) => Promise<SettlingHalves> = (record) => agentHalves(record, inventory),
): Promise<void> {
  let lastProblem = '';
  while (!signal.aborted) {
    let record: MigrationRecord | undefined;
    try {
      // A read that fails (the database restarting) is asked again: it says nothing of whether the migration is settled.
      record = await store.getMigration(id);
      if (record) await settle(record, store, await halves(record), logger.child({ migration: id, vm: record.vm }), why, signal);
      return;
    } catch (err) {
      const problem = describeError(err);
      // Logged once per new reason: an agent down for an hour must not fill the log.
      if (problem !== lastProblem) logger.error({ err: problem, migration: id, vm: record?.vm }, `could not settle migration ${id} yet (${record?.phase ?? 'unknown'}); asking again every ${retryGapMs / 1000} s`);
      lastProblem = problem;
    }
    await sleep(retryGapMs, undefined, { signal }).catch(() => undefined);
  }
}

/**
 * Retires the source of a completed migration whose retirement failed (its agent was down): until
 * then its QEMU sits paused on the old host. Asks again every few seconds until done or `signal` aborts.
 */
export async function retireUntilDone(record: MigrationRecord, inventory: Inventory, logger: Logger, signal: AbortSignal): Promise<void> {
  while (!signal.aborted) {
    try {
      await new RemoteSource(record.from, await inventory.agent(record.from), record.id).retire(record.plan.options.keepSource);
      logger.info(`the source of migration ${record.id} on ${record.from} is retired`);
      return;
    } catch (err) {
      // Nothing of it is left there any more (retired already, or never taken back by a restarted agent).
      if (hasCode(err, 'VMF_NOT_FOUND') || hasCode(err, 'VMF_CONFLICT')) return;
    }
    await sleep(retryGapMs, undefined, { signal }).catch(() => undefined);
  }
}

async function settle(record: MigrationRecord, store: Store, { source, destination }: SettlingHalves, logger: Logger, why: string, signal: AbortSignal): Promise<void> {
  const phase = record.phase;
  const interrupted = `${why} while the migration was ${phase}`;
  // An unresolved migration's report keeps the phases it went through: `unresolved` alone does not say whether post-copy began.
  const postcopy = postcopyMayHaveBegun([...(record.report?.phases.map((p) => p.phase) ?? []), phase]);

  let fate: DestinationFate | undefined;
  let fateUnknown = '';
  if (resumeMayHaveBeenSent(phase)) {
    try {
      fate = await destination.fate(AbortSignal.any([signal, timeoutSignal(`asking ${destination.hostId} whether the guest ran there`, fateTimeoutMs)]));
    } catch (err) {
      fateUnknown = describeError(err);
    }
  }
  const sourceRam = postcopy ? await postcopyRam(source, signal) : undefined;
  const decision = settlement(phase, fate, sourceRam);
  if (fate === 'unknown') {
    // Asking again cannot change the answer: the migration waits for a person, and nobody polls it meanwhile.
    await awaitOperator(store, record, cannotTell(record, postcopy), postcopy, logger);
    return;
  }
  if (decision === 'wait') {
    const problem = postcopy
      ? `post-copy had begun, so ${record.vm}'s memory is split between ${record.from} and ${record.to} and ${record.from} never runs it again; ` +
        (sourceRam === 'completed'
          ? `${record.from} sent all of its RAM, but ${record.to} ${fate === undefined ? `could not say whether the guest is there: ${fateUnknown}` : 'has no QEMU of this migration alive'}`
          : `the RAM migration has not completed on ${record.from}, which still holds pages ${record.to} needs`)
      : `${record.to} could not say whether the guest ran there: ${fateUnknown}`;
    if (phase !== 'unresolved') {
      const where = postcopy
        ? `${record.from} stays paused with the pages ${record.to} still needs and never runs the guest again; ${record.to}'s QEMU is kept; vmferry keeps asking both`
        : `${record.vm} stays paused on ${record.from}; vmferry keeps asking ${record.to}`;
      await markUnresolved(store, record, `${interrupted}; ${problem}. ${where}`);
    }
    throw new Error(problem);
  }
  if (decision === 'resume-destination') {
    // Post-copy delivered every page to a destination that was never continued: the guest can only run there.
    await destination.resume(AbortSignal.any([signal, timeoutSignal(`the resume on ${destination.hostId}`, resumeTimeoutMs)]));
  }
  if (decision === 'finish' || decision === 'resume-destination') {
    // The guest ran on the destination: from here on the source must never run again.
    await source.retire(record.plan.options.keepSource).catch((err: unknown) => {
      if (!hasCode(err, 'VMF_NOT_FOUND')) throw err;
      logger.warn(`${record.from} no longer holds the source half of ${record.id}; nothing to retire there`);
    });
    await store.setVmLocation({ name: record.vm, hostId: record.to });
    await finishMigration(store, record, 'completed', `${interrupted}; ${record.to} confirmed the guest ran there, so the source was retired`);
    logger.info(`migration ${record.id} finished: ${record.vm} runs on ${record.to}`);
    return;
  }
  // Destination first, so the source never runs beside a QEMU that might still resume.
  try {
    await destination.rollback();
  } catch (err) {
    // Before any resume was sent its QEMU cannot have run the guest: the source may go back regardless.
    if (resumeMayHaveBeenSent(phase)) throw err;
    logger.warn({ err: describeError(err) }, `could not roll back ${record.to}'s half of ${record.id}; its agent removes it once its QEMU exits`);
  }
  await store.appendEvent(record.id, { type: 'phase', phase: 'rolling-back', at: Date.now() });
  await source.rollback();
  await finishMigration(store, record, 'failed', `${interrupted}; rolled back: ${record.vm} runs on ${record.from}`);
  logger.info(`migration ${record.id} rolled back: ${record.vm} runs on ${record.from}`);
}

/** Whether the source's RAM migration completed, once post-copy may have begun; a source that cannot say has not. */
async function postcopyRam(source: SettlingHalves['source'], signal: AbortSignal): Promise<PostcopyRam> {
  const info = await source.migrationInfo(AbortSignal.any([signal, timeoutSignal(`asking ${source.hostId} how far post-copy got`, 10_000)])).catch(() => undefined);
  return info?.status === 'completed' ? 'completed' : 'not-completed';
}

/** Stores the migration as unresolved for `message`; one already unresolved keeps its report (its phases say whether post-copy began). */
async function markUnresolved(store: Store, record: MigrationRecord, message: string): Promise<void> {
  let report: MigrationReport;
  if (record.phase === 'unresolved' && record.report) {
    report = { ...record.report };
  } else {
    report = emptyReport(record, 'unresolved', message);
    // The phase it was in stays in the report: the next settle reads from it whether post-copy began.
    report.phases = [{ phase: record.phase, startedAt: record.updatedAt, durationMs: Date.now() - record.updatedAt }];
    await store.appendEvent(record.id, { type: 'phase', phase: 'unresolved', at: Date.now() });
  }
  report.error = { code: 'VMF_UNRESOLVED', message };
  await store.updateMigration(record.id, { phase: 'unresolved', report });
}

/** A migration only an operator can settle: stored (and logged) once with why and the choices, however often it is asked about. */
async function awaitOperator(store: Store, record: MigrationRecord, message: string, postcopy: boolean, logger: Logger): Promise<void> {
  if (record.phase === 'unresolved' && record.report?.error?.message === message) return;
  await markUnresolved(store, record, message);
  logger.error({ postcopy }, `migration ${record.id} waits for an operator: ${message}`);
}

/** A migration's final write: its outcome and how it was reached (also an operator's choice: resolve.ts). */
export async function finishMigration(store: Store, record: MigrationRecord, outcome: 'completed' | 'failed', recovery: string): Promise<void> {
  // What the executor measured before the fault is kept; only the outcome and how it was reached change.
  const report = record.report ? { ...record.report, outcome, recovery, totalMs: Date.now() - record.createdAt } : emptyReport(record, outcome, recovery);
  delete report.error;
  if (outcome === 'failed') report.error = { code: 'VMF_MIGRATION_FAILED', message: recovery };
  const phase: MigrationPhase = outcome;
  await store.appendEvent(record.id, { type: 'phase', phase, at: Date.now() });
  await store.updateMigration(record.id, { phase, report });
}

function emptyReport(record: MigrationRecord, outcome: MigrationReport['outcome'], recovery: string): MigrationReport {
  return {
    vm: record.vm,
    from: record.from,
    to: record.to,
    outcome,
    disks: record.plan.disks.map((disk) => ({ id: disk.id, operation: disk.operation, bytesSent: 0, virtualSize: disk.virtualSize })),
    ram: { transferredBytes: 0, totalBytes: 0, passes: 0, memoryCompared: false },
    phases: [],
    totalMs: Date.now() - record.createdAt,
    downtimeMs: undefined,
    recovery,
  };
}

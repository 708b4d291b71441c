/**
 * Settles the migrations a previous controller process left unfinished. The
 * executor ran in that process, so nothing drives them now: the source may be
 * paused at pre-switchover, mirrors still running, a destination QEMU waiting.
 * The agents know the truth. If the guest already runs on the destination
 * (it resumed there), the migration is finished: the source retires. In every
 * other case it is rolled back, and the guest runs on the source as before.
 * Never two running copies, never none.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { RemoteDestination, RemoteSource, type AgentClient } from '../agent/client.ts';
import { describeError, hasCode } from '../errors.ts';
import type { MigrationPhase, MigrationReport } from '../migration/phases.ts';
import type { MigrationRecord, Store } from '../store/store.ts';
import type { Inventory } from './inventory.ts';

/** How long to keep trying when an agent does not answer yet (it may be restarting too). */
const agentRetryMs = 120_000;
/** A destination in the middle of its resume is left to finish before anything is decided. */
const resumeWaitMs = 60_000;

/** Never rejects: a migration it cannot settle is logged and left as it was. */
export async function settleUnfinishedMigrations(store: Store, inventory: Inventory, logger: Logger, signal: AbortSignal): Promise<void> {
  let unfinished: MigrationRecord[];
  try {
    unfinished = await store.unfinishedMigrations();
  } catch (err) {
    logger.error({ err: describeError(err) }, 'could not read unfinished migrations');
    return;
  }
  for (const record of unfinished) {
    const log = logger.child({ migration: record.id, vm: record.vm });
    try {
      await withAgentRetry(() => settle(record, store, inventory, log, signal), signal);
    } catch (err) {
      log.error({ err: describeError(err) }, `could not settle migration ${record.id} after the controller restarted; it stays "${record.phase}"`);
    }
  }
}

async function settle(record: MigrationRecord, store: Store, inventory: Inventory, logger: Logger, signal: AbortSignal): Promise<void> {
  const sourceAgent = await inventory.agent(record.from);
  const destinationAgent = await inventory.agent(record.to);
  await waitResumeSettled(destinationAgent, record.id, signal);
  const source = new RemoteSource(record.from, sourceAgent, record.id);
  const destination = new RemoteDestination(record.to, destinationAgent, record.id);
  const interrupted = `the controller restarted while the migration was ${record.phase}`;

  if (await runsOn(destinationAgent, record.vm)) {
    // The destination resumed: from here on the source must never run again.
    await source.retire(record.plan.options.keepSource).catch((err: unknown) => {
      if (!hasCode(err, 'VMF_NOT_FOUND')) throw err;
      logger.warn(`${record.from} no longer holds the source half of ${record.id}; nothing to retire there`);
    });
    await store.setVmLocation({ name: record.vm, hostId: record.to });
    await finish(store, record, 'completed', `${interrupted}; the guest already ran on ${record.to}, so the source was retired`);
    logger.info(`migration ${record.id} finished after a controller restart: ${record.vm} runs on ${record.to}`);
    return;
  }
  await store.appendEvent(record.id, { type: 'phase', phase: 'rolling-back', at: Date.now() });
  await source.rollback();
  await destination.rollback();
  await finish(store, record, 'failed', `${interrupted}; rolled back: ${record.vm} runs on ${record.from}`);
  logger.info(`migration ${record.id} rolled back after a controller restart: ${record.vm} runs on ${record.from}`);
}

async function waitResumeSettled(agent: AgentClient, id: string, signal: AbortSignal): Promise<void> {
  const deadline = Date.now() + resumeWaitMs;
  while ((await agent.migrationHalves(id)).destination?.state === 'resuming' && Date.now() < deadline) await sleep(500, undefined, { signal });
}

async function runsOn(agent: AgentClient, vm: string): Promise<boolean> {
  try {
    return (await agent.getVm(vm)).state === 'running';
  } catch (err) {
    if (hasCode(err, 'VMF_NOT_FOUND')) return false;
    throw err;
  }
}

async function finish(store: Store, record: MigrationRecord, outcome: 'completed' | 'failed', recovery: string): Promise<void> {
  const report: MigrationReport = {
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
  if (outcome === 'failed') report.error = { code: 'VMF_MIGRATION_FAILED', message: recovery };
  const phase: MigrationPhase = outcome;
  await store.appendEvent(record.id, { type: 'phase', phase, at: Date.now() });
  await store.updateMigration(record.id, { phase, report });
}

async function withAgentRetry(attempt: () => Promise<void>, signal: AbortSignal): Promise<void> {
  const deadline = Date.now() + agentRetryMs;
  for (;;) {
    try {
      await attempt();
      return;
    } catch (err) {
      if (!hasCode(err, 'VMF_UNREACHABLE') || Date.now() > deadline) throw err;
      await sleep(2_000, undefined, { signal });
    }
  }
}

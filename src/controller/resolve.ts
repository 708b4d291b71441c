/**
 * An operator's settlement of an unresolved migration (`vmferry migration
 * resolve ID --run-on HOST`). When the destination cannot tell whether its
 * guest ran (no-return.ts, `unknown`: its QEMU and its agent died after the
 * resume was sent), no rule can settle the migration without a guess, and
 * only a person can weigh which host's guest to keep. Either way the guest
 * then runs (or can be started) on exactly one host, and no disk is deleted:
 *
 * - the source: the destination drops its half (its disks stay in its
 *   quarantine), then the paused source resumes; outcome `failed`;
 * - the destination: it takes the VM back as a stopped VM (from its
 *   quarantine), then the source's QEMU is stopped, its RAM discarded and its
 *   local disks moved to its quarantine; outcome `completed`.
 *
 * Refused while the destination answers for itself (the controller settles
 * those by the rule), and the source is never chosen once post-copy may have
 * begun: its RAM is split with the destination.
 */
import type { Logger } from 'pino';
import type { VmInfo } from '../api/agent-types.ts';
import { VmferryError, describeError, hasCode } from '../errors.ts';
import { postcopyMayHaveBegun, type DestinationFate } from '../migration/no-return.ts';
import type { DestinationSide, SourceSide } from '../migration/sides.ts';
import type { MigrationRecord, Store } from '../store/store.ts';
import { timeoutSignal } from '../util/abort.ts';
import { finishMigration } from './recovery.ts';

/** What resolving asks of a migration's two halves: the agents', or a test's. */
export interface ResolvingHalves {
  source: Pick<SourceSide, 'hostId' | 'retire' | 'rollback'> & {
    /** Where the VM's local disks are on the source: kept when the operator chooses the destination. */
    localDisks(): Promise<string[]>;
  };
  destination: Pick<DestinationSide, 'hostId' | 'fate' | 'rollback'> & {
    /** The VM whose guest may have run there becomes the destination's, stopped (MigrationSides.takeBackDestination). */
    takeBack(): Promise<VmInfo>;
  };
}

/** As recovery.ts's: the destination first waits for a resume in progress before it answers. */
const fateTimeoutMs = 90_000;

/** Checks the request against the stored migration; returns whether the operator chose the source. */
function validChoice(record: MigrationRecord, runOn: string): boolean {
  if (record.phase !== 'unresolved') {
    throw new VmferryError('VMF_CONFLICT', `migration ${record.id} is ${record.phase}, not unresolved: only an unresolved migration waits for an operator's choice`);
  }
  if (runOn !== record.from && runOn !== record.to) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `--run-on ${runOn} is neither side of migration ${record.id}: choose ${record.from} (its source) or ${record.to} (its destination)`);
  }
  const postcopy = postcopyMayHaveBegun([...(record.report?.phases.map((p) => p.phase) ?? []), record.phase]);
  if (postcopy && runOn === record.from) {
    throw new VmferryError('VMF_CONFLICT', `post-copy had begun in migration ${record.id}, so ${record.vm}'s memory is split between ${record.from} and ${record.to}: ${record.from} never runs it again; only --run-on ${record.to} is possible`);
  }
  return runOn === record.from;
}

/**
 * Refuses a choice the destination's own answer settles by the rule; resolves when it cannot tell (or
 * cannot be asked), and for the destination once it says the guest ran there: a choice of it cut off
 * half-way (the VM taken back, the source not yet retired) is then finished by repeating it.
 */
async function refuseWhereDestinationAnswers(record: MigrationRecord, onSource: boolean, destination: ResolvingHalves['destination']): Promise<void> {
  let fate: DestinationFate;
  try {
    fate = await destination.fate(timeoutSignal(`asking ${destination.hostId} whether the guest ran there`, fateTimeoutMs));
  } catch {
    // Its agent may be gone for good: the steps below still need it, and fail with their own reason if it is.
    return;
  }
  if (fate === 'unknown' || (fate === 'guest-ran' && !onSource)) return;
  const said = fate === 'guest-ran' ? 'the guest ran there' : fate === 'never-ran' ? 'its QEMU never ran the guest' : 'no QEMU of this migration ran the guest there';
  throw new VmferryError('VMF_CONFLICT', `${record.to} answers that ${said}: vmferry settles migration ${record.id} by that itself, and no operator's choice is needed`);
}

/** Settles `record` as the operator chose; returns the final record. */
export async function resolveMigration(record: MigrationRecord, runOn: string, store: Store, { source, destination }: ResolvingHalves, logger: Logger): Promise<MigrationRecord> {
  const onSource = validChoice(record, runOn);
  await refuseWhereDestinationAnswers(record, onSource, destination);
  const chose = `an operator chose ${runOn} (vmferry migration resolve --run-on ${runOn}) because ${record.to} could not tell whether the guest ran there`;
  if (onSource) {
    // Destination first: its half is dropped (its disks kept in its quarantine) before the source may run.
    await destination.rollback();
    await store.appendEvent(record.id, { type: 'phase', phase: 'rolling-back', at: Date.now() });
    await source.rollback();
    await finishMigration(
      store,
      record,
      'failed',
      `${chose}: ${record.vm} resumed on ${record.from} from where it paused. If the guest did run on ${record.to} before its QEMU died, what it did there ` +
        `(writes it acknowledged, data it wrote to shared volumes) is lost and may disagree with what it does now; ${record.to}'s disks of it are kept in its quarantine (vmferry host quarantine list ${record.to})`,
    );
  } else {
    // The destination takes the VM first: should the source's agent fail next, the guest is paused there and stopped here, never lost.
    await destination.takeBack();
    const disks = await source.localDisks().catch((err: unknown) => {
      logger.warn({ err: describeError(err) }, `could not read where ${record.vm}'s local disks are on ${record.from}`);
      return undefined;
    });
    await source.retire(true).catch((err: unknown) => {
      if (!hasCode(err, 'VMF_NOT_FOUND')) throw err;
      logger.warn(`${record.from} no longer holds the source half of ${record.id}; nothing to retire there`);
    });
    await store.setVmLocation({ name: record.vm, hostId: record.to });
    const kept = disks?.length === 0 ? '(it had none)' : `${disks === undefined ? '' : `(${disks.join(', ')}) `}in its quarantine (vmferry host quarantine list ${record.from}) where they were in its pool`;
    await finishMigration(
      store,
      record,
      'completed',
      `${chose}: ${record.vm} is kept on ${record.to}, stopped, with the disks its QEMU had there; start it (vmferry vm start ${record.vm}) and it boots as after a crash. ` +
        `${record.from}'s QEMU was stopped and its RAM discarded; its local disks are kept on ${record.from} ${kept}, for whoever must compare or recover from them, until purged by hand`,
    );
  }
  logger.warn(`migration ${record.id} resolved by an operator: ${record.vm} is on ${runOn}`);
  const settled = await store.getMigration(record.id);
  if (!settled) throw new VmferryError('VMF_NOT_FOUND', `no migration ${record.id}`);
  return settled;
}

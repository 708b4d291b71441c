/**
 * Runs one migration plan over a source and a destination side, step by step
 * as in docs/ARCHITECTURE.md:
 *
 *   1. prepare the destination   (volumes, incoming QEMU, NBD exports)
 *   2. copy local data           (one mirror per local disk, until all READY)
 *   3. move RAM and device state (pre-copy, or with the guest stopped; escalate when it stalls or times out)
 *   4. switch over               (drain mirrors at pre-switchover, continue, compare memory)
 *   5. resume on the destination (the point of no return), retire the source
 *   6. report
 *
 * In post-copy (RamMode `postcopy`, or a switch to it) steps 4 and 5 differ:
 * the mirrors drain at pre-switchover as before, then the source continues
 * into post-copy (from here on it never runs again), the destination resumes
 * as soon as its device state is loaded, and the rest of RAM follows while
 * the guest runs there; the source retires once it reports completed.
 *
 * Each phase is recorded (durably, by the controller) before its step acts.
 * A failure or a cancel before the resume was sent rolls back, destination
 * first: the VM keeps running on the source as before and nothing is left on
 * the destination. From the resume on, the rule of no-return.ts decides:
 * the source runs again only once the destination confirmed its guest never
 * ran there and its QEMU is gone; when it cannot tell, the migration is
 * `unresolved` and the source stays paused.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { VmferryError, describeError, hasCode } from '../errors.ts';
import type { VmSpec } from '../qemu/spec.ts';
import { differingChunks, type MemoryDigest } from '../qemu/memory-digest.ts';
import type { MigrationInfo } from '../qmp/commands.ts';
import { Deadline, abortError, timeoutSignal, waitAtMost } from '../util/abort.ts';
import { StallWatch } from './stall-watch.ts';
import { RamEscalation } from './escalation.ts';
import { finalPhases, type EscalationStep, type GuestReset, type MigrationEvent, type MigrationPhase, type MigrationReport, type PhaseTiming, type RamProgress } from './phases.ts';
import { postcopyCapable, type MigrationPlan } from './plan.ts';
import type { DestinationSide, MigrationMilestone, SourceCompletion, SourceSide } from './sides.ts';
import { cannotTell, postcopyMayHaveBegun, resumeMayHaveBeenSent, settlement, type DestinationFate, type PostcopyRam } from './no-return.ts';
import { PostcopySwitch } from './postcopy.ts';

export interface RunMigrationInput {
  spec: VmSpec;
  plan: MigrationPlan;
  source: SourceSide;
  destination: DestinationSide;
  /** Cancels the migration; the VM stays on the source. */
  signal?: AbortSignal;
  onEvent?: (event: MigrationEvent) => void;
  logger?: Logger;
  /** How often progress is sampled. */
  pollIntervalMs?: number;
  /**
   * Stores a phase before the step it names acts, so whoever settles a fault
   * later knows whether a resume may have been sent. Awaited; final phases are
   * stored with the report by the caller.
   */
  recordPhase?: (phase: MigrationPhase) => Promise<void>;
  /** Test hook: runs as each phase begins; a throw there is a fault injected at that step. */
  beforePhase?: (phase: MigrationPhase) => Promise<void> | void;
}

const mib = 1024 * 1024;
/** The least time between two mirror progress queries. */
const minPollGapMs = 10;
/** A resume is a few QMP commands and a lease grant (whose drain the storage server bounds at 30 s). */
const resumeTimeoutMs = 60_000;
/** Asking the destination whether its guest ran; it first waits for a resume still in progress. */
const fateTimeoutMs = 90_000;
/** Recoveries of a broken post-copy stream per attempt; after one that failed (the link may still be down) the next waits this many progress polls. */
const postcopyRecoveries = 3;
const postcopyRecoveryGapPolls = 20;

/** Phase changes with their timestamps, emitted as they happen. */
class Timeline {
  readonly phases: PhaseTiming[] = [];
  readonly startedAt = Date.now();
  readonly #emit: (event: MigrationEvent) => void;
  readonly #logger: Logger | undefined;

  constructor(emit: (event: MigrationEvent) => void, logger: Logger | undefined) {
    this.#emit = emit;
    this.#logger = logger;
  }

  get current(): MigrationPhase {
    return this.phases.at(-1)?.phase ?? 'pending';
  }

  enter(phase: MigrationPhase): void {
    const now = Date.now();
    const previous = this.phases.at(-1);
    if (previous) previous.durationMs = now - previous.startedAt;
    this.phases.push({ phase, startedAt: now, durationMs: 0 });
    this.#logger?.info({ phase }, `migration phase ${phase}`);
    this.#emit({ type: 'phase', phase, at: now });
  }
}

function ramProgress(info: MigrationInfo): RamProgress | undefined {
  const ram = info.ram;
  if (!ram) return undefined;
  return {
    transferredBytes: ram.transferred,
    remainingBytes: ram.remaining,
    totalBytes: ram.total,
    dirtyRateBytes: ram['dirty-pages-rate'] * ram['page-size'],
    expectedDowntimeMs: info['expected-downtime'],
    iteration: ram['dirty-sync-count'],
  };
}

export async function runMigration(input: RunMigrationInput): Promise<MigrationReport> {
  const { spec, plan, source, destination, logger } = input;
  if (plan.refusals.length > 0) {
    throw new VmferryError('VMF_MIGRATION_REFUSED', `migration of ${plan.vm} to ${plan.to} refused: ${plan.refusals.join('; ')}`);
  }
  const emit = (event: MigrationEvent): void => input.onEvent?.(event);
  const pollMs = input.pollIntervalMs ?? 250;
  const timeline = new Timeline(emit, logger);
  using deadline = new Deadline(`migration of ${plan.vm} to ${plan.to} (--deadline)`, plan.options.deadlineS * 1000, input.signal);
  const signal = deadline.signal;
  const bytesSent = new Map<string, number>();
  const figures: Figures = { info: {}, throttlePercent: 0, stoppedAtUs: null, pauseMs: undefined, memoryCompared: false, escalations: [] };
  const postcopy = new PostcopySwitch(source, emit);
  /** The source's final figures, asked for as soon as its RAM migration completed. */
  let completion: Promise<SourceCompletion | undefined> | undefined;
  // What a rollback has to undo: set before the step that touches it acts, so a half-done step is undone too. The
  // source is always rolled back: its half was bound to the migration before this ran (an agent's source/begin).
  let destinationTouched = false;

  const record = async (phase: MigrationPhase): Promise<void> => {
    timeline.enter(phase);
    if (!finalPhases.includes(phase)) await input.recordPhase?.(phase);
  };
  const enter = async (phase: MigrationPhase): Promise<void> => {
    await record(phase);
    await input.beforePhase?.(phase);
  };
  // Recorded before the stop is sent: from here on a rollback must resume the guest on the source.
  const stopGuest = async (s: AbortSignal): Promise<void> => {
    await enter('stopping');
    await source.stopGuest(s);
    await enter('migrating');
  };
  const escalation = new RamEscalation({ plan, source, attemptStartedAt: timeline.startedAt, emit, stopGuest, postcopy });
  figures.escalations = escalation.steps;
  const finish = async (recovery?: string, resumedAtUs: number | null = null): Promise<MigrationReport> => {
    // The guest runs on the destination: nothing may bring the source back.
    const completed = await (completion ?? readCompletion(source, logger));
    if (completed) {
      figures.info = completed.info;
      figures.stoppedAtUs = completed.stoppedAtUs;
      figures.postcopyMs = completed.postcopyMs;
      // The RAM as QEMU finished it: a RAM phase shorter than one poll would otherwise leave the stream without any.
      const ram = ramProgress(completed.info);
      if (ram) emit({ type: 'ram', ram });
    }
    figures.pauseMs = pauseBetween(figures.stoppedAtUs, resumedAtUs, logger);
    try {
      await source.retire(plan.options.keepSource);
      await record('source-retired');
    } catch (err) {
      logger?.error({ err: describeError(err) }, `source ${source.hostId} did not retire cleanly; the guest runs on ${destination.hostId}`);
    }
    await record('completed');
    const done = report(plan, timeline, 'completed', bytesSent, figures, undefined, postcopy.why);
    if (recovery) done.recovery = recovery;
    return done;
  };

  try {
    // 1. Destination: target volumes, the VM started with -incoming, targets exported over NBD.
    await enter('preparing');
    destinationTouched = true;
    const prepared = await destination.prepare(spec, plan, signal);

    // 2. Source: mirror every local disk into its target, all at once, until each is READY.
    await enter('mirroring');
    const bandwidthBytes = plan.ram.bandwidthMiBs === undefined ? undefined : plan.ram.bandwidthMiBs * mib;
    if (prepared.mirrorTargets.length > 0) {
      await source.startMirrors(prepared.mirrorTargets, plan.options.copyMode, bandwidthBytes, signal);
      await waitMirrorsReady(source, plan, pollMs, signal, emit);
    }

    // 3. RAM and device state: pre-copy until QEMU pauses the source before switch-over. In stop-and-copy the
    // guest stops first (its disks are in sync by now), so the RAM moves in one pass and nothing is dirtied behind it.
    if (plan.ram.mode === 'stop-and-copy') {
      await stopGuest(signal);
      escalation.guestStopped();
    } else {
      await enter('migrating');
    }
    escalation.ramStarted();
    await source.startMigration(
      prepared.migrationUri,
      {
        maxBandwidthBytes: bandwidthBytes,
        // 0: QEMU syncs no dirty bitmap while the guest runs, stopping it at the end of the first pass instead.
        downtimeLimitMs: plan.ram.stopAfterFirstPass ? 0 : (plan.ram.downtimeLimitsMs[0] ?? plan.ram.maxDowntimeMs),
        allowPostcopy: postcopyCapable(plan),
        tls: prepared.tls,
      },
      signal,
    );
    const milestone = await convergeRam(source, escalation, plan, prepared.mirrorTargets.length > 0, pollMs, signal, emit, (info) => {
      figures.info = info;
      figures.throttlePercent = Math.max(figures.throttlePercent, info['cpu-throttle-percentage'] ?? 0);
    });
    if (milestone !== 'pre-switchover') {
      throw new VmferryError('VMF_MIGRATION_FAILED', `RAM migration ended as "${milestone}" before switch-over: ${figures.info['error-desc'] ?? 'no reason given'}`);
    }

    // 4. Switch over: mirrors drain in sync while the images are still active, then the rest of RAM moves.
    await enter('paused-at-switchover');
    for (const { diskId, bytesSent: sent } of await source.finishMirrors(signal)) bytesSent.set(diskId, sent);
    if (postcopy.why !== undefined) {
      // 4-5 in post-copy. Stored before the continue: from there QEMU inactivates the source's images and sends the device
      // state, the destination may run the guest before all of its RAM is there, and the source never runs again.
      // Neither a cancel nor the deadline interrupts what follows, only a stall.
      await enter('postcopy-started');
      await source.continueSwitchover(timeoutSignal(`continuing into post-copy on ${source.hostId}`, resumeTimeoutMs));
      // The memory comparison cannot run: the destination starts before its RAM is complete.
      await destination.waitIncomingRunnable(timeoutSignal(`${destination.hostId} loading the guest's device state for post-copy`, resumeTimeoutMs));
      const { resumedAtUs } = await destination.resume(timeoutSignal(`the resume on ${destination.hostId}`, resumeTimeoutMs));
      await enter('postcopy-active');
      await followPostcopy(source, destination, plan, pollMs, emit, logger, (info) => (figures.info = info));
      figures.postcopyResets = await postcopyResets(destination, logger);
      completion = readCompletion(source, logger);
      await record('resumed');
      return await finish(undefined, resumedAtUs);
    }
    let sourceDigest: PendingDigest | undefined;
    try {
      await source.continueSwitchover(signal);
      // The source's RAM is final (its vCPUs stopped at pre-switchover): its digest runs while the rest of the
      // RAM moves and is ready before the destination's. Started earlier it would compete with the mirrors'
      // drain, which QEMU counts as downtime (docs/BENCHMARKS.md).
      sourceDigest = plan.ram.compareMemory ? new PendingDigest(source, signal) : undefined;
      await destination.waitIncomingCompleted(signal);
      // Read while the memory is compared, off the pause's path: the figures, and when the guest stopped.
      completion = readCompletion(source, logger);
      if (sourceDigest) {
        const compareStarted = performance.now();
        await compareMemory(sourceDigest, destination, signal);
        figures.memoryCompared = true;
        figures.compareMs = Math.round(performance.now() - compareStarted);
      }
    } finally {
      sourceDigest?.abandon();
    }

    // 5. The point of no return, stored before the request leaves. Neither a cancel nor the deadline
    // interrupts a resume: one stopped half-way (lease moved, cont sent) is what only the rule can settle.
    await enter('resume-sent');
    const { resumedAtUs } = await destination.resume(timeoutSignal(`the resume on ${destination.hostId}`, resumeTimeoutMs));
    await record('resumed');
    return await finish(undefined, resumedAtUs);
  } catch (err) {
    const cancelled = input.signal?.aborted === true;
    const faultPhase = timeline.current;
    logger?.warn({ err: describeError(err), phase: faultPhase }, cancelled ? 'migration cancelled' : 'migration failed');
    // A cancel surfaces as whatever wait it interrupted; report it as the cancel it was.
    const cause = cancelled && input.signal ? abortError(input.signal, `migration of ${plan.vm}`) : err;
    const code = cancelled ? 'VMF_ABORTED' : err instanceof VmferryError ? err.code : 'VMF_MIGRATION_FAILED';
    const failure = { code, message: describeError(cause) };
    const recordQuietly = (phase: MigrationPhase): Promise<void> =>
      record(phase).catch((recordErr: unknown) => logger?.error({ err: describeError(recordErr) }, `could not record phase ${phase}`));
    const unresolved = async (why: string): Promise<MigrationReport> => {
      await recordQuietly('unresolved');
      return report(plan, timeline, 'unresolved', bytesSent, figures, { code: 'VMF_UNRESOLVED', message: `${failure.message}; ${why}` }, postcopy.why);
    };

    const postcopyBegan = postcopyMayHaveBegun(timeline.phases.map((p) => p.phase));
    let fate: DestinationFate | undefined;
    let fateUnknown = '';
    if (resumeMayHaveBeenSent(faultPhase)) {
      try {
        fate = await destination.fate(timeoutSignal(`asking ${destination.hostId} whether the guest ran there`, fateTimeoutMs));
      } catch (fateErr) {
        fateUnknown = describeError(fateErr);
      }
    }
    const sourceRam = postcopyBegan ? await postcopyRam(source) : undefined;
    let decision = settlement(faultPhase, fate, sourceRam);
    let resumedAtUs: number | null = null;
    if (decision === 'resume-destination') {
      // Post-copy had delivered every page before the fault, to a destination not continued yet: the guest can only run there.
      try {
        ({ resumedAtUs } = await destination.resume(timeoutSignal(`the resume on ${destination.hostId}`, resumeTimeoutMs)));
        decision = 'finish';
      } catch (resumeErr) {
        fateUnknown = `resuming it there failed: ${describeError(resumeErr)}`;
        decision = 'wait';
      }
    }
    if (decision === 'finish') {
      await recordQuietly('resumed');
      return await finish(`${describeError(cause)}; ${destination.hostId} then confirmed that the guest ran there, so it lives there now`, resumedAtUs);
    }
    if (fate === 'unknown') return await unresolved(cannotTell(plan, postcopyBegan));
    if (decision === 'wait' && postcopyBegan) return await unresolved(postcopyUnfinished(plan, fate, fateUnknown));
    if (decision === 'wait') return await unresolved(destinationUnknown(plan, `${destination.hostId} could not say whether the guest ran there: ${fateUnknown}`));

    // Destination first: its QEMU killed and reaped, so the source can never run beside it.
    const undoFailures: string[] = [];
    if (destinationTouched) {
      try {
        await destination.rollback();
      } catch (undoErr) {
        // Past the point of no return the source may resume only once the destination is confirmed gone.
        if (resumeMayHaveBeenSent(faultPhase)) return await unresolved(destinationUnknown(plan, `the rollback of ${destination.hostId} failed: ${describeError(undoErr)}`));
        undoFailures.push(`roll back destination ${destination.hostId}: ${describeError(undoErr)}`);
      }
    }
    await recordQuietly('rolling-back');
    const guestStopped = timeline.phases.some((p) => p.phase === 'stopping' || p.phase === 'paused-at-switchover');
    try {
      const { pauseMs } = await source.rollback();
      figures.pauseMs = guestStopped ? (pauseMs ?? undefined) : 0;
    } catch (undoErr) {
      // The source's guest may be paused with nobody to resume it: the migration is not over until its agent answers.
      if (hasCode(undoErr, 'VMF_UNREACHABLE') || hasCode(undoErr, 'VMF_TIMEOUT')) {
        return await unresolved(`the rollback of ${source.hostId} could not reach its agent (${describeError(undoErr)}); vmferry keeps trying, and ${plan.vm} runs again on ${plan.from} once it answers`);
      }
      undoFailures.push(`roll back source ${source.hostId}: ${describeError(undoErr)}`);
    }
    // The figures of an attempt whose RAM migration completed (a memory mismatch) are its final ones, not the last sample.
    const completed = await completion;
    if (completed) figures.info = completed.info;
    timeline.enter(cancelled ? 'cancelled' : 'failed');
    const undoText = undoFailures.length ? `; rollback problems: ${undoFailures.join('; ')}` : '';
    return report(plan, timeline, cancelled ? 'cancelled' : 'failed', bytesSent, figures, { code, message: `${failure.message}${undoText}` }, postcopy.why);
  }
}

/** What the report says of RAM and the guest's pause, as the attempt learns it. */
interface Figures {
  /** The source's latest query-migrate: a progress sample, or the final figures once completed. */
  info: MigrationInfo;
  throttlePercent: number;
  stoppedAtUs: number | null;
  pauseMs: number | undefined;
  /** Both ends' memory was found identical before the destination ran. */
  memoryCompared: boolean;
  /** MigrationReport's ram.compareMs. */
  compareMs?: number;
  /** SourceCompletion.postcopyMs. */
  postcopyMs?: number;
  /** DestinationSide.postcopyResets, once all of RAM arrived; absent when not read. */
  postcopyResets?: GuestReset[];
  /** The RAM phase's escalation steps, as taken. */
  escalations: EscalationStep[];
}

/**
 * The guest's resets on the destination while post-copy ran, so that a guest resumed on stale memory that crashed
 * is in the report, not passed off as carried on. Undefined when the destination could not say (logged).
 */
async function postcopyResets(destination: DestinationSide, logger: Logger | undefined): Promise<GuestReset[] | undefined> {
  try {
    const resets = await destination.postcopyResets(timeoutSignal(`reading the guest's resets on ${destination.hostId}`, resumeTimeoutMs));
    if (resets.length > 0) logger?.error({ resets }, `the guest reset on ${destination.hostId} while post-copy ran: its memory there was not what it had on the source`);
    return resets;
  } catch (err) {
    logger?.warn({ err: describeError(err) }, `whether the guest reset on ${destination.hostId} during post-copy is not known`);
    return undefined;
  }
}

/** Whether the source's RAM migration completed, once post-copy may have begun; anything but QEMU's word for it is not. */
async function postcopyRam(source: SourceSide): Promise<PostcopyRam> {
  const info = await source.migrationInfo(timeoutSignal(`asking ${source.hostId} how far post-copy got`, 10_000)).catch(() => undefined);
  return info?.status === 'completed' ? 'completed' : 'not-completed';
}

/** The source's final figures; undefined (logged) when they cannot be read: they are not worth failing a migration for. */
function readCompletion(source: SourceSide, logger: Logger | undefined): Promise<SourceCompletion | undefined> {
  return source.completedInfo(timeoutSignal('reading the final migration figures', 10_000)).catch((err: unknown) => {
    logger?.warn({ err: describeError(err) }, 'could not read final migration figures');
    return undefined;
  });
}

/** The guest's pause from QMP event timestamps of two hosts; undefined when an event was not seen or the clocks disagree. */
function pauseBetween(stoppedAtUs: number | null, resumedAtUs: number | null, logger: Logger | undefined): number | undefined {
  if (stoppedAtUs === null || resumedAtUs === null) return undefined;
  const pauseMs = Math.round((resumedAtUs - stoppedAtUs) / 1000);
  if (pauseMs >= 0) return pauseMs;
  logger?.warn({ stoppedAtUs, resumedAtUs }, "the destination resumed before the source stopped by the hosts' clocks: they are out of step, so the pause is not reported");
  return undefined;
}

function postcopyUnfinished(plan: MigrationPlan, fate: DestinationFate | undefined, fateUnknown: string): string {
  const there = fate === 'guest-ran' ? 'the guest ran there and waits for its pages' : fate === 'never-ran' ? 'the guest is there, never continued' : `it could not say where the guest is (${fateUnknown || 'no answer'})`;
  return (
    `post-copy had begun, so ${plan.vm}'s memory is split between ${plan.from} and ${plan.to} and ${plan.from} never runs it again. ` +
    `${plan.to}'s QEMU is kept (${there}); ${plan.from}'s QEMU stays paused with the pages ${plan.to} has not received. ` +
    `vmferry keeps asking and finishes the migration once ${plan.from} reports its RAM migration completed`
  );
}

function destinationUnknown(plan: MigrationPlan, why: string): string {
  return (
    `the destination may have been told to resume and ${why}. ` +
    `${plan.vm} stays paused on ${plan.from} so that it never runs twice; vmferry keeps asking ${plan.to} and settles the migration once it answers`
  );
}

/** The source's memory digest, started before it is needed and abandoned if the switch-over fails first. */
class PendingDigest {
  readonly hostId: string;
  readonly #controller = new AbortController();
  readonly #digest: Promise<MemoryDigest>;

  constructor(source: SourceSide, signal: AbortSignal) {
    this.hostId = source.hostId;
    this.#digest = source.memoryDigest(AbortSignal.any([signal, this.#controller.signal]));
    // Awaited in compareMemory; until then a failure must not count as unhandled.
    this.#digest.catch(() => undefined);
  }

  get digest(): Promise<MemoryDigest> {
    return this.#digest;
  }

  /** No-op once the digest is in; otherwise the source stops reading (a rollback is about to resume its guest). */
  abandon(): void {
    this.#controller.abort(new Error('the switch-over ended before the memory comparison'));
  }
}

/**
 * Both guests are stopped here: the source after its final pass, the
 * destination before its first instruction. Any difference is memory the
 * migration lost, and resuming on it would crash the guest or corrupt its
 * disks; failing instead rolls back to the intact source.
 */
async function compareMemory(source: PendingDigest, destination: DestinationSide, signal: AbortSignal): Promise<void> {
  const [sourceDigest, destinationDigest] = await Promise.all([source.digest, destination.memoryDigest(signal)]);
  const differing = differingChunks(sourceDigest, destinationDigest);
  if (differing.length === 0) return;
  const mib = sourceDigest.chunkBytes / (1024 * 1024);
  const where = differing.slice(0, 8).map((chunk) => `${chunk * mib} MiB`).join(', ');
  throw new VmferryError(
    'VMF_MEMORY_MISMATCH',
    `the guest's memory on ${destination.hostId} differs from ${source.hostId} in ${differing.length} of ${sourceDigest.chunks.length} ${mib} MiB chunks (at ${where}${differing.length > 8 ? ', …' : ''}): ` +
      'QEMU lost memory writes during pre-copy (a known defect of QEMU 7.2 under TCG, likelier the more passes pre-copy takes); ' +
      'the destination was not resumed and the guest runs on the source. Retry, with a higher --bandwidth or a quieter guest so pre-copy needs fewer passes',
  );
}

async function waitMirrorsReady(
  source: SourceSide,
  plan: MigrationPlan,
  pollMs: number,
  signal: AbortSignal,
  emit: (event: MigrationEvent) => void,
): Promise<void> {
  const stall = new StallWatch('the disk mirrors', plan.options.stallTimeoutS);
  for (let first = true; ; first = false) {
    // Each query after the first waits up to pollMs for a mirror event, so READY is seen as it happens.
    const waitMs = first ? 0 : pollMs;
    const statuses = await stall.read((s) => source.mirrorStatus(s, waitMs), signal);
    const failed = statuses.find((s) => s.error);
    if (failed) throw new VmferryError('VMF_MIGRATION_FAILED', `mirror of disk ${failed.diskId} failed: ${failed.error}`);
    // A READY mirror stands still when the guest writes nothing: only the ones still copying must move.
    const copying = statuses.filter((s) => !s.ready);
    if (copying.length > 0) stall.observe(copying.reduce((sum, s) => sum + s.offset, 0));
    emit({
      type: 'disks',
      disks: plan.disks.map((disk) => {
        const status = statuses.find((s) => s.diskId === disk.id);
        return {
          id: disk.id,
          operation: disk.operation,
          bytesDone: status?.offset ?? 0,
          bytesTotal: status?.len ?? 0,
          ready: status?.ready ?? disk.operation === 'reattach',
        };
      }),
    });
    if (statuses.every((s) => s.ready)) return;
    // A side that answers at once (an agent without event waits) must not be polled in a hot loop.
    await sleep(minPollGapMs, undefined, { signal });
  }
}

/** Samples RAM progress and escalates (stalls, --timeout) until QEMU reaches a milestone. */
async function convergeRam(
  source: SourceSide,
  escalation: RamEscalation,
  plan: MigrationPlan,
  mirroring: boolean,
  pollMs: number,
  signal: AbortSignal,
  emit: (event: MigrationEvent) => void,
  remember: (info: MigrationInfo) => void,
): Promise<MigrationMilestone> {
  const stall = new StallWatch('the RAM migration', plan.options.stallTimeoutS);
  let reached: MigrationMilestone | undefined;
  const milestone = source.waitMilestone(signal).then((m) => (reached = m));
  for (;;) {
    await waitAtMost(milestone, pollMs, signal);
    if (reached !== undefined) return reached;
    const info = await stall.read((s) => source.migrationInfo(s), signal);
    remember(info);
    // A mirror that fails now (its target's pool full, say) would otherwise surface only at switch-over, after all of RAM.
    if (mirroring) {
      const failed = (await stall.read((s) => source.mirrorStatus(s), signal)).find((s) => s.error);
      if (failed) throw new VmferryError('VMF_MIGRATION_FAILED', `mirror of disk ${failed.diskId} failed during the RAM phase: ${failed.error}`);
    }
    const ram = ramProgress(info);
    if (ram) emit({ type: 'ram', ram });
    stall.observe(ram?.transferredBytes ?? 0);
    await escalation.observe(info, signal);
  }
}

/**
 * Post-copy once the destination runs the guest, until the source reports completed. Neither a
 * cancel nor the deadline stops this (the guest's memory is split). A broken stream (a cut link:
 * QEMU's `postcopy-paused`, or no RAM byte moving for the stall timeout) is recovered as QEMU
 * allows, a bounded number of times, each in the event stream: both ends paused, the destination
 * listening anew (migrate-recover), the source resuming to it. Past that the error stands, and the
 * migration is unresolved (no-return.ts).
 */
async function followPostcopy(
  source: SourceSide,
  destination: DestinationSide,
  plan: MigrationPlan,
  pollMs: number,
  emit: (event: MigrationEvent) => void,
  logger: Logger | undefined,
  remember: (info: MigrationInfo) => void,
): Promise<void> {
  for (let recoveries = 0; ; recoveries++) {
    try {
      await followPostcopyStream(source, plan, pollMs, emit, remember);
      return;
    } catch (broken) {
      if (!hasCode(broken, 'VMF_MIGRATION_FAILED') || recoveries >= postcopyRecoveries) throw broken;
      emit({
        type: 'escalation',
        action: 'postcopy-recover',
        detail: `${describeError(broken)}: recovering post-copy (attempt ${recoveries + 1} of ${postcopyRecoveries}): ${destination.hostId} listens anew, ${source.hostId} resumes the stream`,
      });
    }
    try {
      const signal = timeoutSignal(`recovering post-copy between ${source.hostId} and ${destination.hostId}`, resumeTimeoutMs);
      await source.pausePostcopy(signal);
      await source.resumePostcopy(await destination.recoverPostcopy(signal), signal);
    } catch (err) {
      // The link may still be down: the next look finds the stream paused again, and tries again after a gap.
      logger?.warn({ err: describeError(err) }, 'recovering post-copy failed');
      await sleep(postcopyRecoveryGapPolls * pollMs);
    }
  }
}

/** Follows one post-copy stream until the source reports completed; rejects (VMF_MIGRATION_FAILED) when it paused, failed or stalled. */
async function followPostcopyStream(
  source: SourceSide,
  plan: MigrationPlan,
  pollMs: number,
  emit: (event: MigrationEvent) => void,
  remember: (info: MigrationInfo) => void,
): Promise<void> {
  const stall = new StallWatch('the post-copy RAM migration', plan.options.stallTimeoutS);
  const done = new AbortController();
  const signal = done.signal;
  let completed = false;
  // Only `completed` is taken from the events: whether the stream broke is asked each time, since the
  // event of a break already recovered may still be queued.
  const watch = (async () => {
    for (let next = await source.waitMilestone(signal); next !== 'completed'; next = await source.waitMilestone(signal)) {
      // Paused or failed: the progress query says so, with QEMU's reason.
    }
    completed = true;
  })();
  watch.catch(() => undefined);
  try {
    for (;;) {
      await waitAtMost(watch, pollMs, signal);
      if (completed) return;
      const info = await stall.read((s) => source.migrationInfo(s), signal);
      const { status } = info;
      if (status === 'postcopy-paused' || status === 'failed' || status === 'cancelled') {
        throw new VmferryError('VMF_MIGRATION_FAILED', `post-copy ${status === 'postcopy-paused' ? 'paused' : `ended as "${status}"`} on ${source.hostId} before all of the guest's RAM reached ${plan.to}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`);
      }
      remember(info);
      const ram = ramProgress(info);
      if (ram) emit({ type: 'ram', ram });
      stall.observe(ram?.transferredBytes ?? 0);
    }
  } finally {
    done.abort();
  }
}

function report(
  plan: MigrationPlan,
  timeline: Timeline,
  outcome: MigrationReport['outcome'],
  bytesSent: Map<string, number>,
  figures: Figures,
  error: MigrationReport['error'],
  postcopyWhy: string | undefined,
): MigrationReport {
  const { info } = figures;
  const result: MigrationReport = {
    vm: plan.vm,
    from: plan.from,
    to: plan.to,
    outcome,
    disks: plan.disks.map((disk) => ({
      id: disk.id,
      operation: disk.operation,
      bytesSent: bytesSent.get(disk.id) ?? 0,
      virtualSize: disk.virtualSize,
      ...(disk.base ? { base: disk.base.export } : {}),
    })),
    ram: {
      transferredBytes: info.ram?.transferred ?? 0,
      totalBytes: info.ram?.total ?? 0,
      passes: info.ram?.['dirty-sync-count'] ?? 0,
      memoryCompared: outcome === 'completed' && figures.memoryCompared,
      ...(outcome === 'completed' && figures.compareMs !== undefined ? { compareMs: figures.compareMs } : {}),
      throttlePercent: figures.throttlePercent,
      ...(postcopyWhy === undefined ? {} : { postcopyWhy }),
      ...(figures.postcopyMs === undefined ? {} : { postcopyMs: figures.postcopyMs }),
      ...(postcopyWhy !== undefined && info.ram?.['postcopy-requests'] !== undefined ? { postcopyRequests: info.ram['postcopy-requests'] } : {}),
      ...(figures.postcopyResets === undefined ? {} : { postcopyResets: figures.postcopyResets }),
    },
    phases: timeline.phases,
    totalMs: Date.now() - timeline.startedAt,
    downtimeMs: outcome === 'completed' ? info.downtime : undefined,
    ramMode: plan.ram.mode,
  };
  if (figures.escalations.length > 0) result.escalations = [...figures.escalations];
  if (figures.pauseMs !== undefined) result.pauseMs = figures.pauseMs;
  if (error) result.error = error;
  return result;
}

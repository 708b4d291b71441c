/**
 * What a migration is doing, as a table of named phases, and the progress
 * events and final report it produces. A phase advances only on what QEMU
 * reported (an event or a query), never on a sleep.
 */
import type { DiskOperation, RamMode } from './plan.ts';
import type { Prediction } from './prediction.ts';

/** One phase of a migration: what happens once it is stored, and what undoes that. */
export interface MigrationStep {
  phase: string;
  /** Who acts, and how, once the phase is stored (A: the source host, B: the destination). */
  step: string;
  /** What undoes the step after a fault or a cancel. */
  undo: string;
  /** B may have been asked to resume: a fault from here on is settled only by the rule of no-return.ts. */
  pastNoReturn: boolean;
  /** The migration is over; nothing acts any more. */
  final: boolean;
}

/**
 * The migration as a state machine, in order: the one table of its steps.
 * The controller stores each phase before the step acts (the executor's
 * `recordPhase`); docs/ARCHITECTURE.md's table is generated from this one
 * (scripts/steps-doc.ts).
 */
export const migrationSteps = [
  { phase: 'pending', step: 'accepted; nothing has moved yet', undo: '—', pastNoReturn: false, final: false },
  {
    phase: 'preparing',
    step: "B: target volumes in its pool, a tap per NIC on its bridge, QEMU started `-incoming defer -S` with the targets opened through the page cache while they fill (filled-targets.ts), targets exported over NBD with Nagle off on its listener (socket-nodelay.ts; both listeners TLS only, for the source agent only, when B's agent has an identity: docs/SECURITY.md)",
    undo: "B's rollback: QEMU killed and reaped, taps and targets removed",
    pastNoReturn: false,
    final: false,
  },
  {
    phase: 'mirroring',
    step: "A: B's TLS mode held against its own (a mismatch is refused here), then `blockdev-mirror` of every local disk into B's exports, until READY",
    undo: "A's rollback: mirrors cancelled, targets detached",
    pastNoReturn: false,
    final: false,
  },
  {
    phase: 'stopping',
    step: 'stop-and-copy (or the `pause` timeout action) — A: QMP `stop`, so RAM moves in one pass with the guest paused',
    undo: "A's rollback: `migrate_cancel`, guest continued",
    pastNoReturn: false,
    final: false,
  },
  {
    phase: 'migrating',
    step: 'A: pre-copy RAM migration with `pause-before-switchover`; escalation on stalls',
    undo: "A's rollback: `migrate_cancel`, guest continued",
    pastNoReturn: false,
    final: false,
  },
  {
    phase: 'paused-at-switchover',
    step: "A paused: mirrors drained and cancelled in sync, `migrate-continue`, B's incoming completes, memory compared (TCG)",
    undo: "A's rollback: `cont` re-activates its images",
    pastNoReturn: false,
    final: false,
  },
  {
    phase: 'postcopy-started',
    step: "post-copy only, **its point of no return** — A: `migrate-continue` into post-copy (images inactivated, device state sent); B: incoming `postcopy-active`, then resumed as at `resume-sent`",
    undo: 'nothing: the guest\'s RAM is split between the hosts, so A never runs again (no-return.ts); a fault waits (unresolved) until A completes',
    pastNoReturn: true,
    final: false,
  },
  {
    phase: 'postcopy-active',
    step: 'post-copy only — the guest runs on B, which pulls the rest of its RAM from A; a broken stream is recovered (`migrate-recover`, `migrate resume=true`)',
    undo: 'nothing (as `postcopy-started`)',
    pastNoReturn: true,
    final: false,
  },
  {
    phase: 'resume-sent',
    step: "**the point of no return** — B: exports stopped, the targets back in their own cache mode (switched when the RAM phase began), shared volumes' writer lease claimed, `cont`, the NICs announced (`announce-self`)",
    undo: 'only the rule of no-return.ts: finish if B ran the guest, roll back once B confirmed it did not and its QEMU is gone, else wait (unresolved)',
    pastNoReturn: true,
    final: false,
  },
  { phase: 'resumed', step: 'B confirmed the guest runs there; A is still there, paused', undo: '— (the guest lives on B)', pastNoReturn: true, final: false },
  {
    phase: 'source-retired',
    step: 'A: QEMU quit, its taps removed, local copies deleted (unless `--keep-source`)',
    undo: '—',
    pastNoReturn: true,
    final: false,
  },
  { phase: 'completed', step: 'report stored: the guest runs on B', undo: '—', pastNoReturn: true, final: true },
  {
    phase: 'rolling-back',
    step: "undoing after a cancel or a failure, B first (its QEMU killed and reaped), then A's guest continued",
    undo: '—',
    pastNoReturn: false,
    final: false,
  },
  { phase: 'cancelled', step: 'cancelled on request; the guest runs on A as before', undo: '—', pastNoReturn: false, final: true },
  { phase: 'failed', step: 'a step failed; the guest runs on A as before', undo: '—', pastNoReturn: false, final: true },
  {
    phase: 'unresolved',
    step: "a resume may have reached B and B has not said whether its guest ran: A's guest stays paused and vmferry keeps asking; ends as completed or failed once B answers",
    undo: 'the rule of no-return.ts, once B answers',
    pastNoReturn: true,
    final: false,
  },
] as const satisfies readonly MigrationStep[];

export type MigrationPhase = (typeof migrationSteps)[number]['phase'];

export const finalPhases: readonly MigrationPhase[] = migrationSteps.filter((s) => s.final).map((s) => s.phase);

export interface DiskProgress {
  id: string;
  operation: DiskOperation;
  bytesDone: number;
  bytesTotal: number;
  ready: boolean;
}

export interface RamProgress {
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  /** Bytes per second the guest dirties, as QEMU measured it. */
  dirtyRateBytes: number;
  expectedDowntimeMs: number | undefined;
  iteration: number;
}

export type MigrationEvent =
  | { type: 'phase'; phase: MigrationPhase; at: number }
  | { type: 'disks'; disks: DiskProgress[] }
  | { type: 'ram'; ram: RamProgress }
  | { type: 'escalation'; action: EscalationAction; detail: string };

/**
 * Steps taken to get a migration through, in the order they apply
 * (docs/ARCHITECTURE.md, "Escalation"): while pre-copy stalls, a higher
 * downtime limit, then auto-converge throttling (then post-copy, if allowed);
 * when the RAM phase outlasts --timeout, its action (`abort`, `pause`,
 * `postcopy`); a `postcopy-recover` of a broken post-copy stream; across attempts, a `retry` after a memory mismatch and the
 * `fallback` to stop-and-copy.
 */
export type EscalationAction = 'downtime-limit' | 'auto-converge' | 'postcopy' | 'postcopy-recover' | 'pause' | 'abort' | 'retry' | 'fallback';

/** One escalation step as the report lists it: when (ms from the migration's start), what, and why. */
export interface EscalationStep {
  atMs: number;
  action: EscalationAction;
  detail: string;
}

/** A reset of the guest as QEMU reported it (its RESET event): why, and when, in ms after the guest resumed there. */
export interface GuestReset {
  /** QEMU's reason: `guest-reset` (the guest rebooted, or crashed with panic=reboot), `guest-panic`, `host-qmp-system-reset`… */
  reason: string;
  afterResumeMs: number | null;
}

export interface PhaseTiming {
  phase: MigrationPhase;
  startedAt: number;
  durationMs: number;
}

/** What the storage server counted for a re-attached disk's volume; a re-attached disk has no copy job. */
export type StorageIo =
  | {
      measured: true;
      /** Bytes the storage server read and wrote for the volume, from before the first attempt to after the last: the guest's own I/O, from either host. */
      bytesRead: number;
      bytesWritten: number;
    }
  | { measured: false; why: string };

/** One attempt of a migration (see src/controller/attempts.ts), from its own report. */
export interface AttemptSummary {
  startedAt: number;
  durationMs: number;
  outcome: MigrationReport['outcome'];
  /** Why it ended, when it did not complete. */
  error?: { code: string; message: string };
  /** RAM bytes QEMU sent: its final figure, or for an attempt rolled back mid-RAM the last progress sample. */
  ramBytes: number;
  /** Bytes its mirrors sent (known once the mirrors finished at the switch-over; 0 before). */
  diskBytes: number;
  /** How its RAM moved: a fallback runs the last attempt in stop-and-copy. */
  ramMode: RamMode;
  /** QEMU's passes over memory (MigrationReport.ram.passes): under TCG, each one the guest ran through was a chance to lose a write. Absent in logs stored by earlier versions. */
  passes?: number;
  /** QEMU's downtime figure, when the attempt's RAM migration completed. */
  downtimeMs?: number;
  /** The guest's pause (see MigrationReport.pauseMs); 0 when the attempt ended before the switch-over stopped the guest; absent when not measured. */
  pauseMs?: number;
}

export interface MigrationReport {
  vm: string;
  from: string;
  to: string;
  outcome: 'completed' | 'cancelled' | 'failed' | 'unresolved';
  /** Why it did not complete (or why it is unresolved): the first error, with undo failures attached. */
  error?: { code: string; message: string };
  /**
   * Per disk, for the last attempt. `bytesSent`: what its mirror job copied (0 for a re-attached disk: no job
   * exists; `storageIo` says what the storage server saw of it instead). `base`: an overlay's shared base,
   * re-attached on the destination (nothing of it sent).
   */
  disks: { id: string; operation: DiskOperation; bytesSent: number; virtualSize: number; base?: string; storageIo?: StorageIo }[];
  /** The last attempt's RAM figures. memoryCompared: both ends' guest memory was found identical before the destination resumed. */
  ram: {
    transferredBytes: number;
    totalBytes: number;
    /** Passes over memory (QEMU's dirty-sync-count): each one while the guest ran is a chance for TCG to lose a write. */
    passes: number;
    memoryCompared: boolean;
    /**
     * The comparison's share of the guest's pause: from the destination's incoming completion to the verdict (the
     * source's digest overlaps the last RAM transfer). Absent when memory was not compared.
     */
    compareMs?: number;
    /** The highest auto-converge CPU throttle QEMU reported in the progress samples (percent; 0: never throttled). */
    throttlePercent?: number;
    /** Why the migration switched to post-copy, when it did (the memory comparison cannot run then: RAM is still in flight when the destination starts). */
    postcopyWhy?: string;
    /** How long the destination ran the guest while pulling the rest of RAM: the source QEMU's `postcopy-active` to its `completed`, by its event timestamps. */
    postcopyMs?: number;
    /** Pages the destination asked the source for during post-copy (its guest touched them first): QEMU's `postcopy-requests`. */
    postcopyRequests?: number;
    /**
     * Post-copy: every reset of the guest the destination's QEMU reported from its resume until all of RAM was there
     * (none: empty). A guest resumed on stale memory crashes and reboots (docs/QEMU-TCG-PRECOPY.md, "Post-copy").
     */
    postcopyResets?: GuestReset[];
  };
  /** The last attempt's phases. */
  phases: PhaseTiming[];
  /** The whole migration: from the first attempt's start to the end of the last. */
  totalMs: number;
  /** The guest's pause at switch-over as QEMU measured it (its `downtime`), last attempt; undefined unless completed. */
  downtimeMs: number | undefined;
  /**
   * The guest's pause in the last attempt, measured from QMP event timestamps. Completed: the source QEMU's
   * STOP to the destination QEMU's RESUME (two hosts' clocks: keep them in step); it includes what QEMU's
   * downtime leaves out, everything after the source sent its last byte (the destination loading the
   * state, the memory comparison, the lease hand-over and `cont`).
   * Rolled back: the source's STOP to its own RESUME; 0 when the guest was never stopped. Absent when an
   * event was not seen (or the migration is unresolved: the guest is still paused).
   */
  pauseMs?: number;
  /** How the last attempt's RAM moved (the plan's mode, or a fallback's). */
  ramMode?: RamMode;
  /** Every escalation step, oldest first: `atMs` from the migration's start (the first attempt's, once attempts.ts has merged them). */
  escalations?: EscalationStep[];
  /** Attempts it took, when more than one (a rollback for a memory mismatch is retried). */
  attempts?: number;
  /** Every attempt, oldest first, with why each ended (set by src/controller/attempts.ts). */
  attemptLog?: AttemptSummary[];
  /** Sums over every attempt: RAM and mirror bytes sent, and the guest's pauses (absent if one was not measured). */
  allAttempts?: { count: number; ramBytes: number; diskBytes: number; pauseMs?: number };
  /** Set when a restarted controller settled the migration from what the agents reported. */
  recovery?: string;
  /** What the plan predicted (its `prediction`), kept beside the figures above to compare with. */
  prediction?: Prediction;
}

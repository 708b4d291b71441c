/**
 * What a migration is doing, as a union of named phases, and the progress
 * events and final report it produces. A phase advances only on what QEMU
 * reported (an event or a query), never on a sleep.
 */
import type { DiskOperation, RamMode } from './plan.ts';

export type MigrationPhase =
  /** Accepted; nothing has moved yet. */
  | 'pending'
  /** Destination: target volumes created, incoming QEMU started, mirror targets exported over NBD. */
  | 'preparing'
  /** Source: every local disk is being copied into its target while the guest runs. */
  | 'mirroring'
  /**
   * The source's vCPUs are being stopped (QMP stop, recorded before it is sent) so the RAM moves in one pass:
   * stop-and-copy, or the `pause` timeout action. A rollback from here on resumes the guest on the source.
   */
  | 'stopping'
  /** Mirrors are in sync; RAM and device state stream to the destination. */
  | 'migrating'
  /** Source paused before switch-over: mirrors drained and cancelled, the rest of RAM moves, memory compared. */
  | 'paused-at-switchover'
  /** The destination was asked to resume: past the point of no return (see no-return.ts). */
  | 'resume-sent'
  /** The guest runs on the destination; the source is still there, paused. */
  | 'resumed'
  /** The source QEMU has quit and its local copies are gone (unless kept). */
  | 'source-retired'
  /** The guest runs on the destination; the report is final. */
  | 'completed'
  /** Undoing after a cancel or a failure; the source keeps (or gets back) the guest. */
  | 'rolling-back'
  /** Cancelled on request; the VM runs on the source as before. */
  | 'cancelled'
  /** A step failed; the VM runs on the source as before. */
  | 'failed'
  /**
   * A resume may have reached the destination and the destination has not said
   * whether its guest ran: the source stays paused and vmferry keeps asking.
   * Not final: it ends as completed or failed once the destination answers.
   */
  | 'unresolved';

export const finalPhases: readonly MigrationPhase[] = ['completed', 'cancelled', 'failed'];

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
 * `postcopy`); across attempts, a `retry` after a memory mismatch and the
 * `fallback` to stop-and-copy.
 */
export type EscalationAction = 'downtime-limit' | 'auto-converge' | 'postcopy' | 'pause' | 'abort' | 'retry' | 'fallback';

/** One escalation step as the report lists it: when (ms from the migration's start), what, and why. */
export interface EscalationStep {
  atMs: number;
  action: EscalationAction;
  detail: string;
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
    /** The highest auto-converge CPU throttle QEMU reported in the progress samples (percent; 0: never throttled). */
    throttlePercent?: number;
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
}

/**
 * What a migration is doing, as a union of named phases, and the progress
 * events and final report it produces. A phase advances only on what QEMU
 * reported (an event or a query), never on a sleep.
 */
import type { DiskOperation } from './plan.ts';

export type MigrationPhase =
  /** Accepted; nothing has moved yet. */
  | 'pending'
  /** Destination: target volumes created, incoming QEMU started, mirror targets exported over NBD. */
  | 'preparing'
  /** Source: every local disk is being copied into its target while the guest runs. */
  | 'mirroring'
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
  | { type: 'escalation'; action: 'downtime-limit' | 'postcopy' | 'retry'; detail: string };

export interface PhaseTiming {
  phase: MigrationPhase;
  startedAt: number;
  durationMs: number;
}

export interface MigrationReport {
  vm: string;
  from: string;
  to: string;
  outcome: 'completed' | 'cancelled' | 'failed' | 'unresolved';
  /** Why it did not complete (or why it is unresolved): the first error, with undo failures attached. */
  error?: { code: string; message: string };
  /** `base`: an overlay's shared base, re-attached on the destination (nothing of it sent). */
  disks: { id: string; operation: DiskOperation; bytesSent: number; virtualSize: number; base?: string }[];
  /** memoryCompared: both ends' guest memory was found identical before the destination resumed. */
  ram: {
    transferredBytes: number;
    totalBytes: number;
    /** Passes over memory (QEMU's dirty-sync-count): each one while the guest ran is a chance for TCG to lose a write. */
    passes: number;
    memoryCompared: boolean;
  };
  phases: PhaseTiming[];
  totalMs: number;
  /** The guest's pause at switch-over, as QEMU measured it; undefined unless completed. */
  downtimeMs: number | undefined;
  /** Attempts it took, when more than one (a rollback for a memory mismatch is retried). */
  attempts?: number;
  /** Set when a restarted controller settled the migration from what the agents reported. */
  recovery?: string;
}

/**
 * The two halves of a migration as the executor sees them. The executor does
 * not know whether a side is a QEMU in this process or an agent behind HTTP:
 * every argument and result is plain data.
 */
import type { MemoryDigest } from '../qemu/memory-digest.ts';
import type { MigrationInfo } from '../qmp/commands.ts';
import type { NbdServerAddress, VmSpec } from '../qemu/spec.ts';
import type { DestinationFate } from './no-return.ts';
import type { GuestReset } from './phases.ts';
import type { CopyMode, MigrationPlan } from './plan.ts';

/** Where the source sends one local disk's bytes. */
export interface MirrorTarget {
  diskId: string;
  /** What the mirror copies: see DiskPlan.mirrorSync. */
  sync: 'full' | 'top';
  server: NbdServerAddress;
  exportName: string;
  /** The export takes TLS only: PreparedDestination.tls, on each target since the source's mirror request carries only these. */
  tls: boolean;
}

export interface PreparedDestination {
  /** QEMU migration URI the destination listens on, e.g. tcp:10.0.0.2:49152. */
  migrationUri: string;
  /**
   * The destination's QEMU takes the migration stream and its mirror exports
   * over TLS only: true exactly when its agent has a TLS identity. The source
   * holds it against its own before it connects, so a cluster with TLS on one
   * side only fails at once, saying so, instead of in a handshake.
   */
  tls: boolean;
  mirrorTargets: MirrorTarget[];
}

export interface MirrorStatus {
  diskId: string;
  offset: number;
  len: number;
  ready: boolean;
  error?: string;
}

export interface MigrationSettings {
  maxBandwidthBytes?: number | undefined;
  /** QEMU's downtime limit to start with; 0 for a guest that runs through the first pass only (plan.ram.stopAfterFirstPass). */
  downtimeLimitMs: number;
  /** QEMU's postcopy-ram capability: the migration may switch to post-copy (postcopyCapable in plan.ts). The bandwidth cap then holds in post-copy too. */
  allowPostcopy: boolean;
  /** The destination takes the stream over TLS only: PreparedDestination.tls, passed on. */
  tls: boolean;
}

/** Statuses at which the executor must act; the RAM phase waits for one of them. */
export type MigrationMilestone = 'pre-switchover' | 'postcopy-active' | 'postcopy-paused' | 'completed' | 'failed' | 'cancelled';

/**
 * What the destination's incoming side reached once the source continued a post-copy switch-over:
 * `postcopy` (post-copy runs and the device state is loaded: the guest may be continued while RAM
 * still arrives) or `completed` (pre-copy had finished before the switch: all of RAM is there).
 */
export type IncomingRunnable = 'postcopy' | 'completed';

/** The source's figures once its RAM migration completed. */
export interface SourceCompletion {
  info: MigrationInfo;
  /** QEMU's timestamp (µs since the epoch, by the source host's clock) of the STOP that began the guest's pause; null if not seen. */
  stoppedAtUs: number | null;
  /** After post-copy: its `postcopy-active` to its `completed` by the source QEMU's event timestamps; absent if it did not run post-copy or an event was not seen. */
  postcopyMs?: number;
}

/** QEMU's timestamp (µs since the epoch, by the destination host's clock) of its RESUME; null if not seen. */
export interface DestinationResumed {
  resumedAtUs: number | null;
}

/** The guest's pause on a source that was stopped and then resumed by the rollback, STOP to RESUME by its one clock; null if it was not, or an event was not seen. */
export interface SourceRolledBack {
  pauseMs: number | null;
}

export interface DestinationSide {
  readonly hostId: string;
  /** Target volumes for mirrored disks, the VM started with -incoming, targets exported writable over NBD. */
  prepare(spec: VmSpec, plan: MigrationPlan, signal: AbortSignal): Promise<PreparedDestination>;
  /** Resolves when the destination QEMU itself reports the incoming migration completed. */
  waitIncomingCompleted(signal: AbortSignal): Promise<void>;
  /**
   * After the source continued a post-copy switch-over: resolves once this side's guest may be
   * continued (see IncomingRunnable). Rejects when the incoming migration failed or paused first.
   */
  waitIncomingRunnable(signal: AbortSignal): Promise<IncomingRunnable>;
  /** Digest of the incoming guest's memory, once the incoming migration completed and before resume. */
  memoryDigest(signal: AbortSignal): Promise<MemoryDigest>;
  /**
   * Post-copy whose stream broke: makes sure this end is `postcopy-paused` (breaking a stream its QEMU
   * still thinks flows, over a dead link), then listens anew (migrate-recover). Returns the URI the
   * source resumes to. Also after resume: the guest runs here and waits for its pages.
   */
  recoverPostcopy(signal: AbortSignal): Promise<string>;
  /** Stops the NBD exports and resumes the guest; from here on the guest lives on the destination. */
  resume(signal: AbortSignal): Promise<DestinationResumed>;
  /**
   * After a post-copy resume: the guest's resets QEMU reported here since the resume, oldest first; asked once, when
   * all of RAM is here (a guest resumed on stale memory crashes and reboots, docs/QEMU-TCG-PRECOPY.md).
   */
  postcopyResets(signal: AbortSignal): Promise<GuestReset[]>;
  /**
   * Whether the guest ran here, once a resume may have been sent (see
   * no-return.ts). A resume still in progress is waited for first. Rejects
   * when the destination cannot tell (unreachable): the caller must not guess.
   */
  fate(signal: AbortSignal): Promise<DestinationFate>;
  /**
   * Undoes prepare: no QEMU (killed and reaped), no target volume left. Refuses
   * when the guest already ran here. Idempotent.
   */
  rollback(): Promise<void>;
}

export interface SourceSide {
  readonly hostId: string;
  startMirrors(targets: MirrorTarget[], copyMode: CopyMode, bandwidthBytes: number | undefined, signal: AbortSignal): Promise<void>;
  /**
   * Progress of every mirror. With `waitMs`, answers as soon as a mirror turns
   * READY, fails or ends, and at the latest after `waitMs`: the executor learns
   * of READY when it happens, not at its next poll.
   */
  mirrorStatus(signal: AbortSignal, waitMs?: number): Promise<MirrorStatus[]>;
  startMigration(uri: string, settings: MigrationSettings, signal: AbortSignal): Promise<void>;
  migrationInfo(signal: AbortSignal): Promise<MigrationInfo>;
  /** Resolves with the first milestone QEMU reports from now on (or one already reached). */
  waitMilestone(signal: AbortSignal): Promise<MigrationMilestone>;
  setDowntimeLimit(ms: number, signal: AbortSignal): Promise<void>;
  /** Auto-converge, held at a 1 % throttle since the migration started, may now slow the guest as QEMU sees fit (an escalation step). */
  releaseThrottle(signal: AbortSignal): Promise<void>;
  startPostcopy(signal: AbortSignal): Promise<void>;
  /** Post-copy whose stream broke: makes sure this end is `postcopy-paused`, breaking a stream its QEMU still thinks flows. */
  pausePostcopy(signal: AbortSignal): Promise<void>;
  /** Continues a paused post-copy over a new connection to `uri` (DestinationSide.recoverPostcopy). */
  resumePostcopy(uri: string, signal: AbortSignal): Promise<void>;
  /**
   * Stops the guest's vCPUs (QMP stop) so its RAM stops changing: stop-and-copy,
   * or the `pause` timeout action. Its STOP event begins the guest's pause, and
   * a rollback resumes the guest, as after pre-switchover.
   */
  stopGuest(signal: AbortSignal): Promise<void>;
  /**
   * At pre-switchover: cancel every READY mirror so it drains in sync while the
   * images are still active, check each copied everything, drop the NBD targets.
   * Returns the bytes each mirror sent.
   */
  finishMirrors(signal: AbortSignal): Promise<{ diskId: string; bytesSent: number }[]>;
  /** Lets the paused migration finish (migrate-continue pre-switchover). */
  continueSwitchover(signal: AbortSignal): Promise<void>;
  /** Digest of the guest's memory once the migration completed (the source is stopped then). */
  memoryDigest(signal: AbortSignal): Promise<MemoryDigest>;
  /** Final figures once completed (downtime appears a moment after completion), and when the guest stopped. */
  completedInfo(signal: AbortSignal): Promise<SourceCompletion>;
  /** After the destination resumed: quit QEMU, and delete local disks unless kept. */
  retire(keepLocalDisks: boolean): Promise<void>;
  /** Undoes everything done on the source: migration cancelled, mirrors and targets gone, guest running as before. */
  rollback(): Promise<SourceRolledBack>;
}

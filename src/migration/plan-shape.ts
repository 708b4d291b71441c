/**
 * The parts a migration plan is made of (src/migration/plan.ts MigrationPlan):
 * apart from the plan, so that the prediction (which the plan carries) reads
 * the same shapes without importing the planner.
 */

export type CopyMode = 'background' | 'write-blocking';

/**
 * How RAM moves (docs/ARCHITECTURE.md):
 * - `live`: pre-copy while the guest runs, the guest paused only for the last pass;
 * - `postcopy`: pre-copy for one pass, then the destination runs the guest while
 *   it pulls the rest of RAM from the source (src/migration/postcopy.ts);
 * - `stop-and-copy`: the guest paused for the whole RAM phase (disks still mirrored live before it).
 */
export type RamMode = 'live' | 'postcopy' | 'stop-and-copy';

/** What happens when the RAM phase outlasts `timeoutS`, as virsh's --timeout-suspend / --timeout-postcopy: roll back, stop the guest so the rest converges, or switch to post-copy. */
export type TimeoutAction = 'abort' | 'pause' | 'postcopy';

/** The RAM mode the controller may fall back to after repeated memory mismatches (src/controller/attempts.ts). */
export type RamFallback = 'none' | 'stop-and-copy';

export interface MigrationOptions {
  /** Cap on RAM and mirror bandwidth, in MiB/s; unlimited when absent. */
  bandwidthMiBs?: number;
  /** Longest acceptable pause at switch-over, in ms. */
  maxDowntimeMs: number;
  /** Seconds from the start of the RAM phase after which `timeoutAction` is taken (virsh's --timeout). */
  timeoutS: number;
  timeoutAction: TimeoutAction;
  /** Give up (and roll back) when an attempt has not completed after this many seconds, the disk mirrors included. */
  deadlineS: number;
  /** Run the last attempt in this RAM mode when the earlier ones were refused for a memory mismatch. */
  fallback: RamFallback;
  /** Give up (and roll back) when neither the mirrors nor RAM moved a byte for this many seconds: a cut link, a hung peer. */
  stallTimeoutS: number;
  /** How RAM moves. */
  ramMode: RamMode;
  /** In `live` mode: switch to post-copy when pre-copy does not converge (`--allow-postcopy`). */
  allowPostcopy: boolean;
  /** Keep the source's local disk files after success instead of deleting them. */
  keepSource: boolean;
  /** write-blocking makes guest writes wait for the mirror: lower downtime under heavy writes. */
  copyMode: CopyMode;
  /**
   * A TCG guest in `live` mode runs through the first pass of pre-copy only, then QEMU stops it and moves the rest
   * as stop-and-copy (`plan.ram.stopAfterFirstPass`); false lets pre-copy go on for more passes while it runs.
   */
  tcgStopCopy: boolean;
  /** How the destination announces the guest's NICs after the switch-over; default defaultAnnounce. */
  announce?: AnnounceSettings;
}

/**
 * After the switch-over the destination announces the guest's NICs (QMP
 * announce-self): `rounds` announcements, the first after `initialMs`, each
 * gap `stepMs` longer than the last, at most `maxMs`. QEMU's own defaults.
 */
export interface AnnounceSettings {
  initialMs: number;
  maxMs: number;
  rounds: number;
  stepMs: number;
}

export type DiskOperation = 'mirror' | 'reattach';

export interface DiskPlan {
  id: string;
  operation: DiskOperation;
  kind: 'local' | 'shared';
  readOnly: boolean;
  virtualSize: number;
  /** Bytes the operation must copy: allocated bytes for a mirror, 0 for a reattach. */
  bytesToCopy: number;
  /**
   * Mirror sync mode. 'top' for a standalone image: only its allocated data is
   * copied into the fresh (all-zero) target, which is then not pre-zeroed either
   * (sync 'full' would turn every unallocated cluster of the target into an
   * explicit zero cluster, and the next migration would walk them all).
   * 'full' for an overlay, whose backing chain the destination does not have.
   */
  mirrorSync?: 'full' | 'top';
  /**
   * The shared base of an overlay: re-attached read-only on the destination
   * (its overlay there is created on it), never copied. Only the overlay is mirrored.
   */
  base?: { export: string; virtualSize: number; reachable: boolean };
  /** Why this operation was chosen, for the dry-run table. */
  reason: string;
}

/** How the plan moves RAM: MigrationPlan.ram. */
export interface RamPlan {
  memoryMiB: number;
  maxDowntimeMs: number;
  /**
   * QEMU's downtime limit, raised step by step while pre-copy stops
   * converging, up to maxDowntimeMs. Several steps buy a shorter pause for
   * guests that converge; a TCG guest gets only the last, because every extra
   * pass is another chance for QEMU 7.2's TCG defect to lose a write
   * (docs/BENCHMARKS.md, "TCG: where pre-copy's downtime limit starts").
   */
  downtimeLimitsMs: number[];
  bandwidthMiBs?: number;
  /** How RAM moves (RamMode); `postcopy` switches after the first pass of pre-copy, or at once (postcopyAtOnce). */
  mode: RamMode;
  /**
   * `postcopy` mode switches as soon as RAM moves, not after the first pass. Set for TCG guests: QEMU 7.2 under
   * TCG loses writes to pages pre-copy already sent, post-copy never sends those pages again, and nothing
   * compares the memory before the destination runs (docs/QEMU-TCG-PRECOPY.md, "Post-copy"). Plans stored
   * before it have none: after the first pass.
   */
  postcopyAtOnce?: boolean;
  /** In `live` mode: pre-copy that stops converging switches to post-copy (the last step of its escalation). */
  allowPostcopy: boolean;
  /**
   * Compare the guest's memory on both ends before the destination runs. Set
   * for TCG guests: QEMU 7.2 under TCG can lose memory writes in pre-copy
   * (src/qemu/memory-digest.ts), and a guest resumed on corrupt memory
   * crashes or corrupts its disks.
   */
  compareMemory: boolean;
  /**
   * The guest runs through the first pass over its memory only: the migration starts with a downtime limit of
   * 0 ms, so QEMU does not sync its dirty bitmap again while the guest runs; at the end of the pass it stops
   * the guest and sends what was dirtied meanwhile, whatever --max-downtime says. Set for TCG guests in
   * `live` mode (--no-tcg-stop-copy leaves it out): QEMU 7.2 under TCG loses writes made after a sync while
   * the guest runs (docs/QEMU-TCG-PRECOPY.md), and the memory comparison then refuses the attempt. Absent in
   * plans stored by earlier versions.
   */
  stopAfterFirstPass?: boolean;
}

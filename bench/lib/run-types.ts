/** The shapes a benchmark run passes between its methods (migration-run.ts, plain-qmp.ts, libvirt.ts) and reports. */
import type { GuestOptions } from '../../src/guest/test-guest.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';
import type { Cleanup } from '../../test/support/cleanup.ts';

/** vmferry-tls: vmferry with both agents' TLS identities, so RAM and mirror run over TLS (bench/migration.ts --tls). */
/**
 * vmferry-imported: vmferry migrating the user's VM as `vmferry vm import` carries over its libvirt definition
 * (the same machine and cache mode as plain and libvirt run), where `vmferry` runs vmferry's own defaults.
 */
export type Method = 'vmferry' | 'vmferry-imported' | 'vmferry-tls' | 'plain' | 'libvirt';

export interface Scenario {
  /** VM name (also the guest's) and label in tables. */
  name: string;
  memoryMiB: number;
  localSizeMiB: number;
  /** MiB written into the local image before boot, right after the guest's record area (one block unless `stripes`). */
  localFillMiB: number;
  sharedSizeMiB: number;
  /** MiB written into the shared volume before boot, laid out like the local fill; default none. */
  sharedFillMiB?: number;
  /**
   * Write the fills as `sizeMiB` stripes every `everyMiB` from `fromMiB` on (many
   * extents, as a file system leaves them) instead of one block after the record area.
   */
  stripes?: { fromMiB: number; sizeMiB: number; everyMiB: number };
  /** vCPUs; default 1. */
  vcpus?: number;
  guest: GuestOptions;
  /** Acks per disk to wait for after boot, so the workload is in full swing. */
  warmupAcks: number;
  /** And at least this long after boot (the guest touches its dirty area gradually). */
  warmupMs?: number;
}

export interface Sample {
  /** ms since the method started. */
  t: number;
  jobs: { device: string; offset: number; len: number; ready: boolean }[];
  ram: { status: string; remaining: number; transferred: number; total: number } | undefined;
}

export interface RunResult {
  method: Method;
  scenario: string;
  totalMs: number;
  downtimeMs: number;
  /** STOP on A to RESUME on B, from QEMU's event timestamps. */
  pauseMs: number;
  ramBytes: number;
  mirrorBytes: number;
  sharedBytes: number;
  localAllocatedBytes: number;
  /** Guest RAM in use on B right after the migration (what had to arrive), and on A just before it. */
  ramInUseBytes: number;
  ramInUseBeforeBytes: number;
  samples: Sample[];
  /** Named moments, ms since the method started (vmferry's phases, the plain script's steps). */
  marks: { label: string; t: number }[];
  /** The guest acknowledged new records on B after the migration. */
  guestAlive: boolean;
  /** libvirt only: bytes the bridge sent to B's namespace during the migration (its veth's tx counter). */
  bridgeToDestinationBytes?: number;
  /** Which settings the method ran with when not its defaults (bench/variants.ts). */
  variant?: string;
  /** vmferry: attempts it took (a memory mismatch is rolled back and tried again); others: 1. */
  attempts: number;
  /** vmferry: why each attempt before the last ended. */
  refusals?: string[];
  /** Sum of the guest's pauses over every attempt (vmferry's rolled-back attempts paused it too), ms. */
  pausesMs?: number;
  /** vmferry: how long B ran the guest while the rest of RAM arrived (post-copy), ms. */
  postcopyMs?: number;
  /** QEMU's pre-copy passes (dirty-sync-count) of the last attempt. */
  passes?: number;
  /** vmferry: the memory comparison's share of the pause (report.ram.compareMs), last attempt. */
  compareMs?: number;
  /** plain with compareRam: 1 MiB chunks of guest RAM that differed between A and B before `cont`. */
  ramDiffChunks?: number[];
  /** Acknowledged records as the host saw them arrive (ack-watch.ts): worst gap around the migration, pace before, pace while mirroring. */
  ackGapMs?: number;
  ackBeforeMs?: number;
  ackMirroringMs?: number;
}

/** What the methods get: the source QEMU running the guest, and where host B keeps things. */
export interface Host {
  dir: string;
  spec: VmSpec;
  localPath: string;
  poolB: string;
  runB: string;
  /** Set by the method: the destination's report log, to see the guest go on there. */
  destinationReportLog?: string;
  cleanup: Cleanup;
}

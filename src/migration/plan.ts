/**
 * The planner: for one VM and one destination, decide per piece of data which
 * operation moves it — `mirror` for local disks, `reattach` for shared volumes
 * the destination reaches — or refuse with the reason, before anything moves.
 * Pure: every fact about the destination comes in as data, probed beforehand.
 */
import type { Accelerator } from '../qemu/command-line.ts';
import { memoryDigestMaxMiB } from '../qemu/memory-digest.ts';
import { downtimeSteps } from './convergence.ts';
import type { DiskSpec, NbdServerAddress, VmSpec } from '../qemu/spec.ts';
import type { Prediction } from './prediction.ts';
import type { AnnounceSettings, DiskPlan, MigrationOptions, RamFallback, RamMode, RamPlan, TimeoutAction } from './plan-shape.ts';
import { formatBytes } from '../util/format.ts';

export type { AnnounceSettings, CopyMode, DiskOperation, DiskPlan, MigrationOptions, RamFallback, RamMode, RamPlan, TimeoutAction } from './plan-shape.ts';

export const ramModes: readonly RamMode[] = ['live', 'postcopy', 'stop-and-copy'];
export const timeoutActions: readonly TimeoutAction[] = ['abort', 'pause', 'postcopy'];
export const ramFallbacks: readonly RamFallback[] = ['none', 'stop-and-copy'];

export const defaultAnnounce: AnnounceSettings = { initialMs: 50, maxMs: 550, rounds: 5, stepMs: 100 };

export const defaultMigrationOptions: MigrationOptions = {
  maxDowntimeMs: 300,
  timeoutS: 600,
  timeoutAction: 'abort',
  deadlineS: 24 * 3600,
  fallback: 'none',
  stallTimeoutS: 30,
  ramMode: 'live',
  allowPostcopy: false,
  keepSource: false,
  copyMode: 'write-blocking',
  tcgStopCopy: true,
  announce: defaultAnnounce,
};

/** Facts about a local disk on the source, read from its image. */
export interface LocalDiskFacts {
  virtualSize: number;
  /** Bytes that hold data: what a mirror must send. */
  allocatedBytes: number;
  /** An overlay's backing chain must be copied too (sync full); a standalone image needs only its own data. */
  backingFile: string | undefined;
}

/** What the destination reported when probed. */
export interface DestinationFacts {
  hostId: string;
  /** The address the source reaches it at (its agent's --address): where the plan lets the VM's disks and RAM go. */
  address: string;
  qemuVersion: string;
  /** Machine types the destination's QEMU supports (aliases resolved, e.g. q35 → pc-q35-7.2). */
  machineTypes: string[];
  /** What runs guests on the destination: every QEMU its agent starts uses it. */
  accelerator: Accelerator;
  /** The VM's CPU model, and the features the destination's QEMU cannot offer for it under its accelerator (null: it does not know the model). */
  cpu: { model: string; unavailableFeatures: string[] | null };
  freeMemoryMiB: number;
  poolFreeBytes: number;
  /** Shared exports the destination actually connected to, keyed by exportKey(); value is the size it saw. */
  reachableExports: Record<string, number>;
  /** VM names already present on the destination. */
  vmNames: string[];
  /** The bridges named by the VM's NICs that exist on the destination (absent: it did not say, so none). */
  bridges?: string[];
}

export interface SourceFacts {
  hostId: string;
  qemuVersion: string;
  /** The machine type the running VM uses, resolved (pc-q35-7.2, not q35). */
  machineType: string;
  /** What runs the guest's vCPUs: the kernel (kvm) or QEMU's own translator (tcg). */
  accelerator: Accelerator;
  localDisks: Record<string, LocalDiskFacts>;
}

export interface MigrationPlan {
  vm: string;
  from: string;
  to: string;
  /** The destination's address: the source sends the VM's disks and RAM there and nowhere else (src/agent/request-guard.ts). */
  toAddress: string;
  disks: DiskPlan[];
  ram: RamPlan;
  options: MigrationOptions;
  /** Reasons the migration must not start; empty when it may. */
  refusals: string[];
  /** Time, passes and pause predicted from the guest's measured dirty rate (src/migration/prediction.ts); absent when not measured. */
  prediction?: Prediction;
}

export function exportKey(server: NbdServerAddress, exportName: string): string {
  const where = server.type === 'inet' ? `nbd://${server.host}:${server.port}` : `nbd+unix://${server.path}`;
  return `${where}/${exportName}`;
}

/** An RBD image's key in reachableExports (Ceph's own name for it; where the cluster is comes from the disk's conf). */
export function rbdKey(pool: string, image: string): string {
  return `rbd:${pool}/${image}`;
}

/** Memory the destination needs beyond the guest's RAM: QEMU's own overhead, generously. */
const qemuOverheadMiB = 64;

function planDisk(disk: DiskSpec, source: SourceFacts, destination: DestinationFacts, refusals: string[]): DiskPlan {
  const readOnly = disk.readOnly ?? false;
  if (disk.source.kind === 'file') {
    if (readOnly) {
      // A read-only local image would have to be copied into a target the destination opens read-only.
      refusals.push(`disk ${disk.id}: read-only local images are not migrated yet; put read-only media on the storage server`);
    }
    const facts = source.localDisks[disk.id];
    if (!facts) {
      refusals.push(`disk ${disk.id}: no facts about its image ${disk.source.path} on ${source.hostId}`);
      return { id: disk.id, operation: 'mirror', kind: 'local', readOnly, virtualSize: 0, bytesToCopy: 0, reason: 'local image' };
    }
    const backing = disk.source.backing;
    if (backing) {
      const key = exportKey(backing.server, backing.export);
      const seenSize = destination.reachableExports[key];
      if (seenSize === undefined) refusals.push(`disk ${disk.id}: ${destination.hostId} cannot reach shared volume ${key}, the base of its overlay`);
      return {
        id: disk.id,
        operation: 'mirror',
        kind: 'local',
        readOnly,
        virtualSize: facts.virtualSize,
        bytesToCopy: facts.allocatedBytes,
        // The destination's overlay reads through the same base: only the overlay's own data moves.
        mirrorSync: 'top',
        base: { export: key, virtualSize: seenSize ?? 0, reachable: seenSize !== undefined },
        reason: `local qcow2 overlay on ${source.hostId}: its own data copied while the guest runs; its base ${seenSize === undefined ? `is NOT reachable from ${destination.hostId}` : 're-attached'}`,
      };
    }
    return {
      id: disk.id,
      operation: 'mirror',
      kind: 'local',
      readOnly,
      virtualSize: facts.virtualSize,
      bytesToCopy: facts.allocatedBytes,
      mirrorSync: facts.backingFile ? 'full' : 'top',
      reason: `local ${disk.source.format} on ${source.hostId}: copied while the guest runs`,
    };
  }
  const key = disk.source.kind === 'rbd' ? rbdKey(disk.source.pool, disk.source.image) : exportKey(disk.source.server, disk.source.export);
  const seenSize = destination.reachableExports[key];
  const plan: DiskPlan = {
    id: disk.id,
    operation: 'reattach',
    kind: 'shared',
    readOnly,
    virtualSize: seenSize ?? 0,
    bytesToCopy: 0,
    reason: `${readOnly ? 'read-only ' : ''}shared volume ${key}, reachable from ${destination.hostId}: re-attached, nothing copied`,
  };
  if (seenSize === undefined) {
    refusals.push(`disk ${disk.id}: ${destination.hostId} cannot reach shared volume ${key}`);
    plan.reason = `shared volume ${key} is NOT reachable from ${destination.hostId}`;
  }
  return plan;
}

export function planMigration(
  spec: VmSpec,
  source: SourceFacts,
  destination: DestinationFacts,
  options: MigrationOptions,
): MigrationPlan {
  const refusals: string[] = [];
  if (source.hostId === destination.hostId) refusals.push(`the VM already runs on ${destination.hostId}`);
  if (destination.vmNames.includes(spec.name)) refusals.push(`${destination.hostId} already has a VM named ${spec.name}`);
  if (!destination.machineTypes.includes(source.machineType)) {
    refusals.push(`${destination.hostId} (QEMU ${destination.qemuVersion}) does not support machine type ${source.machineType}`);
  }
  if (source.accelerator !== destination.accelerator) {
    // QEMU saves a KVM guest's CPU state in KVM's terms; TCG neither restores it faithfully nor keeps the guest's timing.
    refusals.push(
      `the VM runs under ${source.accelerator.toUpperCase()} on ${source.hostId} but ${destination.hostId} runs guests under ${destination.accelerator.toUpperCase()}: ` +
        `QEMU does not move a guest between KVM and TCG (\`vmferry host list\` shows why each host uses its accelerator)`,
    );
  }
  const missingFeatures = destination.cpu.unavailableFeatures;
  if (missingFeatures === null) {
    refusals.push(`${destination.hostId} (QEMU ${destination.qemuVersion}) does not know CPU model ${destination.cpu.model}`);
  } else if (missingFeatures.length > 0) {
    refusals.push(
      `${destination.hostId} cannot run CPU model ${destination.cpu.model} under ${destination.accelerator.toUpperCase()}: ` +
        `its QEMU lacks ${missingFeatures.join(', ')}`,
    );
  }
  const disks = spec.disks.map((disk) => planDisk(disk, source, destination, refusals));
  for (const nic of spec.nics ?? []) {
    if (!destination.bridges?.includes(nic.bridge)) refusals.push(`NIC ${nic.id}: ${destination.hostId} has no bridge ${nic.bridge} for its tap`);
  }

  const neededMiB = spec.memoryMiB + qemuOverheadMiB;
  if (destination.freeMemoryMiB < neededMiB) {
    refusals.push(`${destination.hostId} has ${destination.freeMemoryMiB} MiB of free memory; the VM needs ${neededMiB} MiB`);
  }
  // A mirror target grows to the source's allocation (and may reach its virtual size as the guest writes).
  const neededPoolBytes = disks.filter((d) => d.operation === 'mirror').reduce((sum, d) => sum + d.bytesToCopy, 0);
  if (destination.poolFreeBytes < neededPoolBytes) {
    refusals.push(`${destination.hostId}'s pool has ${formatBytes(destination.poolFreeBytes)} free; the local disks need ${formatBytes(neededPoolBytes)}`);
  }
  if (options.maxDowntimeMs < 1) refusals.push('max downtime must be at least 1 ms');
  if (source.accelerator === 'tcg' && options.ramMode === 'live' && (options.allowPostcopy || options.timeoutAction === 'postcopy')) {
    // A late switch resumes B on pages pre-copy sent before TCG lost writes to them; post-copy never resends them and no comparison can run.
    refusals.push(
      `${options.allowPostcopy ? '--allow-postcopy' : '--timeout-action postcopy'} switches to post-copy after pre-copy passes, and under TCG QEMU 7.2 loses guest writes ` +
        'to pages those passes sent: the destination would run the guest on stale memory (docs/QEMU-TCG-PRECOPY.md, "Post-copy"). ' +
        'Use --ram-mode postcopy (a TCG guest switches at once) or --timeout-action pause',
    );
  }
  return {
    vm: spec.name,
    from: source.hostId,
    to: destination.hostId,
    toAddress: destination.address,
    disks,
    ram: {
      memoryMiB: spec.memoryMiB,
      maxDowntimeMs: options.maxDowntimeMs,
      downtimeLimitsMs: source.accelerator === 'tcg' ? [options.maxDowntimeMs] : downtimeSteps(options.maxDowntimeMs),
      bandwidthMiBs: options.bandwidthMiBs,
      mode: options.ramMode,
      postcopyAtOnce: source.accelerator === 'tcg',
      allowPostcopy: options.allowPostcopy,
      compareMemory: source.accelerator === 'tcg' && spec.memoryMiB <= memoryDigestMaxMiB,
      // (A late switch to post-copy, which would need the guest running after the first pass, is refused for TCG above.)
      ...(source.accelerator === 'tcg' && options.ramMode === 'live' && options.tcgStopCopy ? { stopAfterFirstPass: true } : {}),
    },
    options,
    refusals,
  };
}

/** The plan an attempt runs: the stored one, or its fallback's RAM mode (src/controller/attempts.ts). */
export function withRamMode(plan: MigrationPlan, mode: RamMode): MigrationPlan {
  return mode === plan.ram.mode ? plan : { ...plan, ram: { ...plan.ram, mode } };
}

/**
 * Whether QEMU must be ready for post-copy on both ends: QEMU takes the
 * postcopy-ram capability only before the migration starts, so a timeout
 * action that may switch to post-copy needs it from the start.
 */
export function postcopyCapable(plan: Pick<MigrationPlan, 'ram' | 'options'>): boolean {
  return plan.ram.allowPostcopy || plan.ram.mode === 'postcopy' || plan.options.timeoutAction === 'postcopy';
}

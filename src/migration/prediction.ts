/**
 * Predicts a planned migration's total time, RAM passes and guest pause from two measured figures: how fast
 * the guest dirties its memory (QEMU's calc-dirty-rate on the source) and how fast the link moves bytes. The
 * model is the textbook one for pre-copy (docs/PREDICTION.md): the mirrors send the local disks' allocated
 * bytes, the first pass over RAM sends the memory the guest uses, and each later pass sends what the guest
 * dirtied during the one before, until what is left moves within the downtime limit. Pure: every figure
 * comes in as data, measured beforehand.
 */

import type { DiskPlan, MigrationOptions, RamPlan } from './plan-shape.ts';

/** The parts of a plan (src/migration/plan.ts MigrationPlan) the model reads. */
export interface PlannedFigures {
  disks: Pick<DiskPlan, 'operation' | 'bytesToCopy'>[];
  ram: Pick<RamPlan, 'memoryMiB' | 'maxDowntimeMs' | 'bandwidthMiBs' | 'mode' | 'stopAfterFirstPass'>;
  options: Pick<MigrationOptions, 'timeoutS' | 'timeoutAction'>;
}

/** What the source's agent measured of the running guest's RAM (src/migration/probe.ts measureGuestRam). */
export interface GuestRamFacts {
  /** QEMU's estimate of the bytes per second the guest dirties (calc-dirty-rate, whole MiB/s: 0 means under 1 MiB/s). */
  dirtyRateBytesPerS: number;
  /** How QEMU measured it, and over how long. */
  dirtyRateMethod: string;
  calcTimeS: number;
  /** The guest's RAM that holds data: what the first pass sends as pages (zero pages cost QEMU a header each). */
  inUseBytes: number;
  /** Where inUseBytes comes from: the host's page tables of QEMU's guest RAM, or all of the guest's RAM when they could not be read. */
  inUseBasis: string;
}

/** What the link between the two hosts carries, and how that was known. */
export interface LinkFacts {
  bytesPerS: number;
  basis: string;
}

export interface Prediction {
  /** The mirrors and every pass that runs at the cap; absent when the link's speed is not known. The switch-over's set-up and hand-over are not in it. */
  totalMs?: number;
  /** Passes over memory as QEMU counts them (its dirty-sync-count, the report's `ram.passes`). */
  passes?: number;
  /**
   * The RAM share of the guest's pause, at most: what is left once the guest is stopped, sent at the cap. When QEMU
   * stops the guest itself at the end of pre-copy it lifts the cap for that rest, which then moves at the link's own
   * speed (not measured): shorter on a link faster than the cap. The switch-over adds its own share on top.
   */
  pauseMs?: number;
  /**
   * Pre-copy reaches the switch-over: what is left moves within --max-downtime at the cap (QEMU's own test, with its
   * measured, capped, bandwidth), or for a TCG guest that runs one pass only, always. False: it never gets there.
   */
  converges?: boolean;
  dirtyRateBytesPerS: number;
  linkBytesPerS?: number;
  /** Bytes the mirrors send, and the first RAM pass. */
  diskBytes: number;
  ramBytes: number;
  /** How each figure was come by, and what the model leaves out, in sentences for people. */
  basis: string[];
}

/** Passes the model follows before it calls pre-copy stuck: QEMU's escalation (src/migration/escalation.ts) acts well before. */
const maxModelledPasses = 100;

export function predictMigration(plan: PlannedFigures, ram: GuestRamFacts, link: LinkFacts | undefined): Prediction {
  const diskBytes = plan.disks.filter((d) => d.operation === 'mirror').reduce((sum, d) => sum + d.bytesToCopy, 0);
  const memoryBytes = plan.ram.memoryMiB * 1024 * 1024;
  const ramBytes = Math.min(ram.inUseBytes, memoryBytes);
  const basis = [
    `dirty rate ${describeRate(ram.dirtyRateBytesPerS)}: QEMU's calc-dirty-rate (${ram.dirtyRateMethod}, ${ram.calcTimeS} s)`,
    `first pass ${mib(ramBytes)}: ${ram.inUseBasis}`,
  ];
  const figures = { dirtyRateBytesPerS: ram.dirtyRateBytesPerS, diskBytes, ramBytes };
  if (!link) {
    basis.push('time, passes and pause not predicted: no --bandwidth cap, and vmferry does not probe the link yet');
    return { ...figures, basis };
  }
  basis.push(`link ${describeRate(link.bytesPerS)}: ${link.basis}`);
  const B = link.bytesPerS;
  const mirrorS = diskBytes / B;
  const limitS = plan.ram.maxDowntimeMs / 1000;
  // Pages dirtied over `seconds`: the guest cannot dirty more than its RAM (the model knows no smaller working set).
  const dirtied = (seconds: number): number => Math.min(ram.dirtyRateBytesPerS * seconds, memoryBytes);
  // `cappedRamS`: RAM sent at the cap; a rest that QEMU sends uncapped is in the pause's bound only.
  const result = (cappedRamS: number, passes: number | undefined, pauseS: number, converges: boolean): Prediction => ({
    ...figures,
    linkBytesPerS: B,
    totalMs: Math.round((mirrorS + cappedRamS) * 1000),
    ...(passes === undefined ? {} : { passes }),
    pauseMs: Math.round(pauseS * 1000),
    converges,
    basis,
  });

  if (plan.ram.mode === 'stop-and-copy') {
    basis.push('stop-and-copy: the guest stopped for the one pass over its RAM, at the cap');
    return result(ramBytes / B, 3, ramBytes / B, true);
  }
  if (plan.ram.mode === 'postcopy') {
    basis.push('post-copy: the guest runs on the destination while its RAM follows; the pause is the switch-over alone');
    return result(ramBytes / B, 1, 0, true);
  }
  const firstS = ramBytes / B;
  if (plan.ram.stopAfterFirstPass) {
    basis.push('TCG: one pass while the guest runs, then QEMU stops the guest and sends what it dirtied during that pass, uncapped');
    return result(firstS, 2, dirtied(firstS) / B, true);
  }
  // QEMU syncs its dirty bitmap as RAM starts to move, after each pass, and once more with the guest stopped.
  basis.push(`pre-copy: each pass sends what the guest dirtied during the one before, until it moves within ${plan.ram.maxDowntimeMs} ms`);
  let ramS = firstS;
  let passS = firstS;
  for (let passes = 2; passes <= maxModelledPasses; passes++) {
    const restS = dirtied(passS) / B;
    if (restS <= limitS) return result(ramS, passes + 1, restS, true);
    ramS += restS;
    passS = restS;
  }
  // The guest dirties memory as fast as the link sends it: what --timeout-action says happens at the timeout.
  const { timeoutS, timeoutAction } = plan.options;
  const pauseS = timeoutAction === 'pause' ? dirtied(passS) / B : 0;
  basis.push(`pre-copy does not converge (auto-converge's throttling not modelled): after ${timeoutS} s of RAM, ${timeoutAction}`);
  return result(timeoutS + pauseS, undefined, pauseS, false);
}

/** The plan's bandwidth cap as the link's speed: QEMU sends no faster (it may send slower: a link slower than the cap is not seen). */
export function capOf(plan: Pick<PlannedFigures, 'ram'>): LinkFacts | undefined {
  const cap = plan.ram.bandwidthMiBs;
  return cap === undefined ? undefined : { bytesPerS: cap * 1024 * 1024, basis: `the plan's --bandwidth cap (the link itself not probed)` };
}

function mib(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function describeRate(bytesPerS: number): string {
  return bytesPerS === 0 ? 'under 1 MiB/s' : `${mib(bytesPerS)}/s`;
}

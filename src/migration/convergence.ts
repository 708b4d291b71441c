/**
 * Watches pre-copy RAM migration and says when it has stopped converging:
 * the bytes left at the start of each pass over memory no longer shrink.
 * Each time it does, the next step of the escalation ladder applies.
 */
import type { MigrationInfo } from '../qmp/commands.ts';

export type Escalation =
  | { action: 'downtime-limit'; downtimeLimitMs: number }
  | { action: 'auto-converge' }
  | { action: 'postcopy' };

/** Passes over memory without a 10% improvement before the migration counts as stalled. */
const stalledPasses = 3;
const improvement = 0.9;

/** Downtime limits to try, smallest first: the migration switches over as soon as it fits under one. */
export function downtimeSteps(maxDowntimeMs: number): number[] {
  if (maxDowntimeMs < 1) return [maxDowntimeMs];
  const steps = [Math.round(maxDowntimeMs / 4), Math.round(maxDowntimeMs / 2), maxDowntimeMs].filter((ms) => ms >= 1);
  return [...new Set(steps)];
}

export class ConvergenceWatch {
  readonly #ladder: Escalation[];
  #lastPass = -1;
  #bestRemaining = Number.POSITIVE_INFINITY;
  #passesWithoutProgress = 0;

  /**
   * `downtimeLimitsMs`: the plan's steps; the migration starts at the first, the
   * rest are escalations. Then auto-converge throttling, which slows the guest
   * rather than lengthening its pause, then post-copy if allowed.
   */
  constructor(downtimeLimitsMs: number[], allowPostcopy: boolean) {
    const [, ...higher] = downtimeLimitsMs;
    this.#ladder = higher.map((ms): Escalation => ({ action: 'downtime-limit', downtimeLimitMs: ms }));
    this.#ladder.push({ action: 'auto-converge' });
    if (allowPostcopy) this.#ladder.push({ action: 'postcopy' });
  }

  /** Feeds one query-migrate result; returns the escalation to apply now, if any. */
  observe(info: MigrationInfo): Escalation | undefined {
    const ram = info.ram;
    if (!ram || ram['dirty-sync-count'] === this.#lastPass) return undefined;
    this.#lastPass = ram['dirty-sync-count'];
    if (ram.remaining < this.#bestRemaining * improvement) {
      this.#bestRemaining = ram.remaining;
      this.#passesWithoutProgress = 0;
      return undefined;
    }
    this.#passesWithoutProgress++;
    if (this.#passesWithoutProgress < stalledPasses) return undefined;
    this.#passesWithoutProgress = 0;
    return this.#ladder.shift();
  }
}

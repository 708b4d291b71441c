/**
 * What the RAM phase does to get through, in order (docs/ARCHITECTURE.md,
 * "Escalation"): while pre-copy stalls, the ladder of ConvergenceWatch
 * (higher downtime limits, then auto-converge throttling, then post-copy if
 * allowed); once the phase outlasts --timeout, its action, as virsh's
 * --timeout: roll back (`abort`), stop the guest so the rest converges
 * (`pause`), or switch to post-copy (`postcopy`). Each step is emitted as an
 * `escalation` event with why, and kept for the report.
 */
import { VmferryError } from '../errors.ts';
import type { MigrationInfo } from '../qmp/commands.ts';
import { ConvergenceWatch } from './convergence.ts';
import type { EscalationAction, EscalationStep, MigrationEvent } from './phases.ts';
import type { MigrationPlan } from './plan.ts';
import { formatBytes } from '../util/format.ts';
import type { PostcopySwitch } from './postcopy.ts';
import type { SourceSide } from './sides.ts';

export interface RamEscalationInput {
  plan: MigrationPlan;
  source: SourceSide;
  /** When the attempt started: steps are kept as ms from it. */
  attemptStartedAt: number;
  emit: (event: MigrationEvent) => void;
  /** Stops the source's guest, its phase recorded first (the executor's stopGuest). */
  stopGuest: (signal: AbortSignal) => Promise<void>;
  /** The attempt's one switch to post-copy (it emits its own escalation event). */
  postcopy: PostcopySwitch;
}

export class RamEscalation {
  /** Steps taken so far, `atMs` from the attempt's start. */
  readonly steps: EscalationStep[] = [];
  readonly #input: RamEscalationInput;
  readonly #watch: ConvergenceWatch;
  #ramStartedAt: number | undefined;
  #guestStopped: boolean;
  #timeoutTaken = false;

  constructor(input: RamEscalationInput) {
    this.#input = input;
    this.#watch = new ConvergenceWatch(input.plan.ram.downtimeLimitsMs, input.plan.ram.allowPostcopy);
    this.#guestStopped = false;
  }

  /** The RAM phase begins: --timeout counts from here. */
  ramStarted(now = Date.now()): void {
    this.#ramStartedAt = now;
  }

  /** The guest was stopped outside the escalation (stop-and-copy): nothing is left for the ladder or `pause` to do. */
  guestStopped(): void {
    this.#guestStopped = true;
  }

  /** Feeds one progress sample: applies the ladder's next step when pre-copy stalls, then the timeout action when its time has come. */
  async observe(info: MigrationInfo, signal: AbortSignal, now = Date.now()): Promise<void> {
    const { source } = this.#input;
    // A stopped guest dirties nothing, and after post-copy began nothing of pre-copy applies.
    const step = this.#guestStopped || this.#input.postcopy.why !== undefined ? undefined : this.#watch.observe(info);
    if (step?.action === 'downtime-limit') {
      this.#take('downtime-limit', `not converging: downtime limit raised to ${step.downtimeLimitMs} ms`, now);
      await source.setDowntimeLimit(step.downtimeLimitMs, signal);
    } else if (step?.action === 'auto-converge') {
      this.#take('auto-converge', 'not converging at the largest downtime limit: auto-converge may now throttle the guest', now);
      await source.releaseThrottle(signal);
    } else if (step?.action === 'postcopy') {
      await this.#switchToPostcopy('not converging with the guest throttled: switching to post-copy', signal, now);
    }
    // As libvirt's --postcopy-after-precopy: QEMU counts a pass done when it syncs the dirty bitmap for the next one
    // (its first sync is at the start). A TCG guest switches at once: every page pre-copy sends may go stale unseen.
    const ram = info.ram;
    const { mode, postcopyAtOnce } = this.#input.plan.ram;
    if (mode === 'postcopy' && ram && ram['dirty-sync-count'] >= (postcopyAtOnce ? 1 : 2)) {
      const sent = `${formatBytes(ram.transferred)} sent, ${formatBytes(ram.remaining)} still to send`;
      const why = postcopyAtOnce
        ? `post-copy mode, at once for a TCG guest (QEMU 7.2 under TCG loses writes to pages pre-copy already sent; ${sent})`
        : `post-copy mode: the first pass of pre-copy is done (${sent})`;
      await this.#switchToPostcopy(`${why}; ${this.#input.plan.to} takes over the guest and pulls the rest`, signal, now);
    }
    await this.#timeoutAction(signal, now);
  }

  async #timeoutAction(signal: AbortSignal, now: number): Promise<void> {
    const { plan } = this.#input;
    if (this.#timeoutTaken || this.#ramStartedAt === undefined || now - this.#ramStartedAt < plan.options.timeoutS * 1000) return;
    this.#timeoutTaken = true;
    const after = `the RAM phase ran ${plan.options.timeoutS} s (--timeout)`;
    switch (plan.options.timeoutAction) {
      case 'abort':
        this.#take('abort', `${after}: rolling back`, now);
        throw new VmferryError(
          'VMF_TIMEOUT',
          `${after} without converging and --timeout-action is abort: rolled back, the guest runs on ${plan.from}; ` +
            'give a longer --timeout, a higher --bandwidth, or --timeout-action pause (stop the guest so its RAM moves in one pass)',
        );
      case 'pause':
        if (this.#guestStopped) return;
        this.#take('pause', `${after}: stopping the guest so the rest of its RAM moves in one pass (stop-and-copy)`, now);
        this.#guestStopped = true;
        await this.#input.stopGuest(signal);
        return;
      case 'postcopy':
        await this.#switchToPostcopy(`${after}: switching to post-copy`, signal, now);
        return;
    }
  }

  /** The switch to post-copy, once: kept as a step here, its event emitted by the PostcopySwitch. */
  async #switchToPostcopy(why: string, signal: AbortSignal, now: number): Promise<void> {
    if (this.#input.postcopy.why !== undefined) return;
    this.steps.push({ atMs: now - this.#input.attemptStartedAt, action: 'postcopy', detail: why });
    await this.#input.postcopy.request(why, signal);
  }

  #take(action: EscalationAction, detail: string, now: number): void {
    this.steps.push({ atMs: now - this.#input.attemptStartedAt, action, detail });
    this.#input.emit({ type: 'escalation', action, detail });
  }
}

/**
 * The switch from pre-copy to post-copy (docs/ARCHITECTURE.md, "Post-copy").
 * Whoever decides that pre-copy has run long enough asks here: RamMode
 * `postcopy` after the first pass, the convergence ladder's last step for
 * `--allow-postcopy`, a timeout action. The executor then takes the post-copy
 * path at the switch-over.
 *
 * `migrate-start-postcopy` only sets a flag in QEMU: at its next iteration it
 * stops the guest and, with pause-before-switchover, waits at `pre-switchover`
 * before anything of post-copy has happened (QEMU 7.2 postcopy_start:
 * migration_maybe_pause comes before the images are inactivated and the device
 * state is sent). Until the executor continues from there, a rollback still
 * gives the guest back to the source whole.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import type { MigrationInfo } from '../qmp/commands.ts';
import type { MigrationEvent } from './phases.ts';
import type { MigrationPlan } from './plan.ts';
import type { SourceSide } from './sides.ts';

/** How often a post-copy being paused is asked whether it got there: QEMU takes milliseconds. */
const pausePollMs = 20;

/** Whether QEMU's postcopy-ram capability is needed on both ends: the migration may switch to post-copy. */
export function postcopyCapable(ram: Pick<MigrationPlan['ram'], 'mode' | 'allowPostcopy'>): boolean {
  return ram.mode === 'postcopy' || ram.allowPostcopy;
}

/** The post-copy request of one migration attempt: sent at most once, with why. */
export class PostcopySwitch {
  readonly #source: SourceSide;
  readonly #emit: (event: MigrationEvent) => void;
  #why: string | undefined;

  constructor(source: SourceSide, emit: (event: MigrationEvent) => void) {
    this.#source = source;
    this.#emit = emit;
  }

  /** Why post-copy was asked for; undefined while it was not. */
  get why(): string | undefined {
    return this.#why;
  }

  /**
   * Asks QEMU to switch to post-copy (a no-op once asked). The event says why; it is emitted before
   * the request, so that a failed request is still explained. The plan must be postcopyCapable.
   */
  async request(why: string, signal: AbortSignal): Promise<void> {
    if (this.#why !== undefined) return;
    this.#why = why;
    this.#emit({ type: 'escalation', action: 'postcopy', detail: why });
    await this.#source.startPostcopy(signal);
  }
}

/**
 * Waits until a post-copy is `postcopy-paused` on one end: after migrate-pause QEMU gets there as soon
 * as its migration thread sees the broken stream. Any other end state is a failure.
 */
export async function waitPostcopyPaused(what: string, query: () => Promise<MigrationInfo>, signal: AbortSignal): Promise<void> {
  for (;;) {
    const { status } = await query();
    if (status === 'postcopy-paused') return;
    if (status !== 'postcopy-active' && status !== 'postcopy-recover') {
      throw new VmferryError('VMF_MIGRATION_FAILED', `${what} is "${status ?? 'unknown'}", not paused: it cannot be recovered`);
    }
    await sleep(pausePollMs, undefined, { signal });
  }
}

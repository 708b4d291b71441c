/**
 * Notices a migration that has stopped moving: no mirror offset and no RAM
 * byte advanced for a while. A cut network link does not fail QEMU's sockets
 * for many minutes (TCP keeps retransmitting), so without this the migration
 * would sit until its overall timeout.
 */
import { VmferryError } from '../errors.ts';
import { Deadline } from '../util/abort.ts';

const hint = 'is the network between the hosts down, or the destination hung?';

export class StallWatch {
  readonly #limitMs: number;
  readonly #what: string;
  #lastProgress = -1;
  #since = Date.now();

  constructor(what: string, limitS: number) {
    this.#what = what;
    this.#limitMs = limitS * 1000;
  }

  /**
   * Runs one progress query under the limit. A query that gets no answer is
   * a stall too: after a cut link QEMU's main loop can sit on the dead
   * socket, and the query would otherwise wait out its own, longer timeout.
   */
  async read<T>(query: (signal: AbortSignal) => Promise<T>, signal: AbortSignal): Promise<T> {
    using deadline = new Deadline(`reading the progress of ${this.#what}`, this.#limitMs, signal);
    try {
      return await query(deadline.signal);
    } catch (err) {
      if (signal.aborted || !deadline.signal.aborted) throw err;
      throw new VmferryError('VMF_MIGRATION_FAILED', `${this.#what} made no progress: QEMU did not report any for ${this.#limitMs / 1000} s (${hint})`, { cause: err });
    }
  }

  /** Feeds the current progress counter (bytes done); throws once it has not moved for the limit. */
  observe(progress: number, now = Date.now()): void {
    if (progress !== this.#lastProgress) {
      this.#lastProgress = progress;
      this.#since = now;
      return;
    }
    if (now - this.#since >= this.#limitMs) {
      throw new VmferryError(
        'VMF_MIGRATION_FAILED',
        `${this.#what} made no progress for ${Math.round((now - this.#since) / 1000)} s (${hint})`,
      );
    }
  }
}

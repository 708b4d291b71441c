/**
 * Fencing of controllers that lost the leader lease (src/controller/leader-lease.ts).
 * The leader stamps its lease epoch on every request it sends an agent; the
 * agent keeps the highest epoch it has seen, on disk so a restart does not
 * forget it, and refuses any request stamped with a lower one: a leader that
 * was paused or cut off from PostgreSQL while a standby took over cannot make
 * a host act, whatever it still believes. A request without a stamp is a
 * single controller's (SQLite), which nothing can fence, and is let through.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { VmferryError } from '../errors.ts';
import { writeFileDurable } from '../util/durable-file.ts';

/** The header carrying the sender's lease epoch. */
export const leaderEpochHeader = 'vmferry-leader-epoch';

/** What a controller stamps on its requests to agents (src/controller/leadership.ts). */
export interface EpochStamp {
  /** For a request that makes a host act: the epoch; throws VMF_NOT_LEADER when this controller does not lead. Undefined with a single controller. */
  acting(): number | undefined;
  /** For a read: the epoch while leading, else nothing (a standby reads too). */
  reading(): number | undefined;
}

/** The headers a request carries for `epoch`. */
export function epochHeaders(epoch: number | undefined): Record<string, string> | undefined {
  return epoch === undefined ? undefined : { [leaderEpochHeader]: String(epoch) };
}

export class LeaderEpochFence {
  readonly #file: string;
  readonly #logger: Logger;
  #highest: number;
  /** Saves run one after another, so a lower epoch never overwrites a higher one on disk. */
  #saving: Promise<void> = Promise.resolve();

  private constructor(file: string, highest: number, logger: Logger) {
    this.#file = file;
    this.#highest = highest;
    this.#logger = logger;
  }

  /** Reads the highest epoch this agent has seen from `dataDir` (0: none yet). */
  static async load(dataDir: string, logger: Logger): Promise<LeaderEpochFence> {
    const file = join(dataDir, 'leader-epoch');
    const text = await readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return '0';
      throw err;
    });
    const highest = Number(text.trim());
    if (!Number.isSafeInteger(highest) || highest < 0) throw new VmferryError('VMF_INVALID_ARGUMENT', `${file} must hold a leader epoch, a whole number (holds "${text.slice(0, 40)}")`);
    return new LeaderEpochFence(file, highest, logger);
  }

  get highest(): number {
    return this.#highest;
  }

  /** Admits a request stamped `header` (or not stamped), or refuses it with VMF_STALE_LEADER. */
  async admit(header: string | string[] | undefined, what: string): Promise<void> {
    if (header === undefined) return;
    const text = Array.isArray(header) ? header.join(',') : header;
    if (!/^\d{1,15}$/.test(text)) throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid request: header ${leaderEpochHeader} must be a whole number (got "${text.slice(0, 40)}")`);
    const epoch = Number(text);
    if (epoch < this.#highest) {
      this.#logger.warn({ epoch, highest: this.#highest }, `refused ${what} from a controller with leader epoch ${epoch}`);
      throw new VmferryError(
        'VMF_STALE_LEADER',
        `${what} refused: it carries leader epoch ${epoch}, and this agent has seen epoch ${this.#highest} — the controller that sent it lost the leader lease to another`,
      );
    }
    if (epoch === this.#highest) return;
    this.#highest = epoch;
    this.#logger.info({ epoch }, `a controller leads with epoch ${epoch}`);
    const file = this.#file;
    const saved = this.#saving.then(() => (epoch === this.#highest ? writeFileDurable(file, `${epoch}\n`) : undefined));
    this.#saving = saved.catch(() => undefined);
    // Acted on only once saved: an agent restarted after acting for epoch N still refuses N - 1.
    await saved;
  }
}

/** Checks every request's stamp before its route runs (after the access check: an unknown caller is refused first). */
export function installEpochFence(app: FastifyInstance, fence: LeaderEpochFence): void {
  app.addHook('preHandler', async (request) => {
    await fence.admit(request.headers[leaderEpochHeader], `${request.method} ${request.url.split('?')[0] ?? ''}`);
  });
}

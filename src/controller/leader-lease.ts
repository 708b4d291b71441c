/**
 * Which of several controllers sharing one PostgreSQL database acts: the one
 * holding the lease row, for a time-to-live it renews. Each new tenure gets a
 * higher epoch, the fencing token its requests are to carry, so an agent can
 * refuse a leader that lost the lease without knowing it (paused, cut off).
 *
 * Expiry is judged by the database's clock, never by comparing two machines'
 * clocks. The leader counts its own tenure from before it sent the renewal,
 * on its monotonic clock: it stops calling itself leader no later than the
 * database lets a standby take over (clock rates aside).
 */
import { performance } from 'node:perf_hooks';
import pg from 'pg';
import type { Logger } from 'pino';
import { describeError, VmferryError } from '../errors.ts';
import { withConnection } from '../store/pg-checkout.ts';
import { applySchema } from '../store/postgres-schema.ts';
import { redactedUrl } from '../store/postgres-store.ts';

export interface LeaseView {
  /** True while this controller holds the lease by its own clock. */
  leader: boolean;
  /** The lease holder's id (its URL, for a redirect) and epoch, as last read; null before any controller took it. */
  holder: string | null;
  epoch: number | null;
}

export interface LeaderLeaseOptions {
  /** This controller's id in the lease: the URL standbys redirect to. */
  id: string;
  /** How long a renewal holds the lease; a standby takes over at most this long (plus one poll) after the leader's last renewal. */
  ttlMs: number;
  logger: Logger;
  /** Called on each change of `view().leader` or epoch, in order. */
  onChange?: (view: LeaseView) => void;
}

// Takes the lease when it is free or expired (a new tenure: epoch + 1), renews it when this controller holds
// it (same epoch), and otherwise returns the current holder. The second SELECT sees the row as it was before
// this statement, which is what a standby needs: who holds it.
const acquireSql = `
WITH attempt AS (
  INSERT INTO vmferry_leader AS l (id, holder, epoch, expires_at) VALUES (1, $1, 1, clock_timestamp() + $2 * interval '1 millisecond')
  ON CONFLICT (id) DO UPDATE SET
    holder = excluded.holder,
    epoch = CASE WHEN l.holder = excluded.holder AND l.expires_at > clock_timestamp() THEN l.epoch ELSE l.epoch + 1 END,
    expires_at = excluded.expires_at
  WHERE l.holder = excluded.holder OR l.expires_at <= clock_timestamp()
  RETURNING holder, epoch)
SELECT holder, epoch, true AS mine FROM attempt
UNION ALL SELECT holder, epoch, false AS mine FROM vmferry_leader WHERE NOT EXISTS (SELECT 1 FROM attempt)`;

export class LeaderLease {
  readonly #client: pg.Pool;
  readonly #options: LeaderLeaseOptions;
  readonly #name: string;
  #holder: string | null = null;
  #epoch: number | null = null;
  /** performance.now() until which this controller holds the lease; 0 when it does not. */
  #until = 0;
  #reported: { leader: boolean; epoch: number | null } = { leader: false, epoch: null };
  #timer: NodeJS.Timeout | undefined;
  /** Fires when the lease runs out unrenewed, so onChange hears of the loss then, not at the next attempt. */
  #expiry: NodeJS.Timeout | undefined;
  #stopped = false;
  #round: Promise<void> = Promise.resolve();

  private constructor(pool: pg.Pool, name: string, options: LeaderLeaseOptions) {
    this.#client = pool;
    this.#name = name;
    this.#options = options;
  }

  /** Applies the schema, makes a first attempt at the lease, then keeps trying (standby) or renewing (leader) every third of the TTL. */
  static async start(url: string, options: LeaderLeaseOptions): Promise<LeaderLease> {
    const name = redactedUrl(url);
    // One connection; every query bounded, so a renewal that hangs (a cut link) cannot hold the loop past the lease.
    const pool = new pg.Pool({ connectionString: url, max: 1, connectionTimeoutMillis: options.ttlMs / 3, query_timeout: options.ttlMs / 3, application_name: `vmferry-lease ${options.id}` });
    pool.on('error', (err) => options.logger.warn({ err: describeError(err), db: name }, 'the lease connection broke'));
    try {
      await withConnection(pool, (client) => applySchema(client, name));
    } catch (err) {
      await pool.end();
      throw err instanceof VmferryError ? err : new VmferryError('VMF_DATABASE', `database ${name}: ${describeError(err)}`, { cause: err });
    }
    const lease = new LeaderLease(pool, name, options);
    await lease.#attempt();
    lease.#schedule();
    return lease;
  }

  view(): LeaseView {
    return { leader: this.#isLeader(), holder: this.#holder, epoch: this.#epoch };
  }

  /** The epoch to stamp on a request that acts; refused (VMF_NOT_LEADER, naming the leader) when this controller does not hold the lease. */
  fence(): number {
    if (!this.#isLeader() || this.#epoch === null) {
      throw new VmferryError('VMF_NOT_LEADER', `this controller is a standby; the leader is ${this.#holder ?? 'not known yet'}`);
    }
    return this.#epoch;
  }

  /** Stops renewing; a leader gives the lease up at once so a standby need not wait for it to expire. */
  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    await this.#round;
    clearTimeout(this.#expiry);
    const wasLeader = this.#isLeader();
    this.#until = 0;
    this.#report();
    try {
      if (wasLeader) await this.#client.query('UPDATE vmferry_leader SET expires_at = clock_timestamp() WHERE holder = $1 AND epoch = $2', [this.#options.id, this.#epoch]);
    } catch (err) {
      this.#options.logger.warn({ err: describeError(err), db: this.#name }, 'could not give the lease up: a standby takes over when it expires');
    } finally {
      await this.#client.end();
    }
  }

  #isLeader(): boolean {
    return performance.now() < this.#until;
  }

  #schedule(): void {
    if (this.#stopped) return;
    this.#timer = setTimeout(() => {
      this.#round = this.#attempt().then(() => this.#schedule());
    }, this.#options.ttlMs / 3);
  }

  async #attempt(): Promise<void> {
    const sentAt = performance.now();
    try {
      const { rows } = await this.#client.query<{ holder: string; epoch: string; mine: boolean }>(acquireSql, [this.#options.id, this.#options.ttlMs]);
      const row = rows[0];
      this.#holder = row?.holder ?? null;
      this.#epoch = row ? Number(row.epoch) : null;
      this.#until = row?.mine ? sentAt + this.#options.ttlMs : 0;
      clearTimeout(this.#expiry);
      if (row?.mine) this.#expiry = setTimeout(() => this.#report(), Math.ceil(this.#until - performance.now()) + 1);
    } catch (err) {
      // Not renewed: the lease runs out on its own at #until; nothing is assumed about the database's state.
      this.#options.logger.warn({ err: describeError(err), db: this.#name }, 'could not reach the database for the leader lease');
    }
    this.#report();
  }

  #report(): void {
    const leader = this.#isLeader();
    if (leader === this.#reported.leader && (!leader || this.#epoch === this.#reported.epoch)) return;
    this.#reported = { leader, epoch: this.#epoch };
    this.#options.logger.info({ leader, epoch: this.#epoch, holder: this.#holder }, leader ? `leader, epoch ${this.#epoch}` : `standby; the leader is ${this.#holder ?? 'not known yet'}`);
    this.#options.onChange?.(this.view());
  }
}

/**
 * One writer per shared volume. A client names itself in the export name,
 * `VOLUME@TOKEN` (a token per QEMU instance, e.g. `host-b.3f9c1a7e20d4`); a
 * plain `VOLUME` has no token. Until a volume's first grant every connection
 * may write (tools such as qemu-img and nbdcopy, and single-host setups). Once
 * granted, only connections carrying the lease holder's token write; any
 * other write, from a stale source that still runs or a host that was never
 * meant to write, gets EPERM before it reaches the file.
 *
 * The server numbers the grants: each one gets the volume's next generation,
 * so nobody can pick a number that locks everyone else out. Grants of one
 * volume run one at a time, and a grant is committed (persisted, then
 * visible to writes) only once every write that passed the check under the
 * old lease has finished; writes that arrive meanwhile wait for the outcome.
 * If the old writes do not finish in time, the grant fails and the old lease
 * stays, so a failed grant never leaves a volume that nobody holds.
 *
 * A released lease (release()) keeps the volume fenced with no holder:
 * nobody writes until the next grant. That is the safe answer for an agent
 * that killed the QEMU holding it: which instance should write next is the
 * migration's decision, made by a new claim, never a guess here.
 *
 * Tokens are the only thing that tells writers apart, so they never appear in
 * listings (see publicLease()); they are random per QEMU instance, which is
 * what makes a stale process unable to write once the lease has moved.
 */
import type Database from 'better-sqlite3';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import { NbdBackendError } from '../nbd/backend.ts';
import { NbdErrno } from '../nbd/constants.ts';
import { KeyedQueue } from './keyed-queue.ts';

export interface WriterLease {
  /** The token of the one client allowed to write; null once released (then nobody may). */
  holder: string | null;
  generation: number;
  grantedAt: number;
}

/** What listings show of a lease: that there is one, its generation, and whether someone holds it; never the token. */
export interface PublicLease {
  generation: number;
  grantedAt: number;
  held: boolean;
}

export function publicLease(lease: WriterLease): PublicLease {
  return { generation: lease.generation, grantedAt: lease.grantedAt, held: lease.holder !== null };
}

export const writerTokenPattern = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/;

/** `vol@host-b.7` → volume `vol`, token `host-b.7`; a name without `@` has no token. */
export function parseExportName(exportName: string): { volume: string; token: string | undefined } {
  const at = exportName.indexOf('@');
  if (at < 0) return { volume: exportName, token: undefined };
  return { volume: exportName.slice(0, at), token: exportName.slice(at + 1) };
}

/** How long a grant waits for the old holder's in-flight writes; they are bounded by the NBD server's limits. */
export const defaultDrainTimeoutMs = 30_000;

interface LeaseRow {
  volume: string;
  holder: string;
  generation: number;
  granted_at: number;
}

export class WriterLeases {
  readonly #db: Database.Database;
  readonly #drainTimeoutMs: number;
  readonly #leases = new Map<string, WriterLease>();
  /** Writes under way per volume, by the token that made them (`''` for none). */
  readonly #inFlight = new Map<string, Map<string, number>>();
  /** Per volume, the grants and releases under way, one at a time; writes wait for them. */
  readonly #changes = new KeyedQueue();

  constructor(db: Database.Database, options: { drainTimeoutMs?: number } = {}) {
    this.#db = db;
    this.#drainTimeoutMs = options.drainTimeoutMs ?? defaultDrainTimeoutMs;
    // A released lease is stored with an empty holder, which no token can be.
    db.exec('CREATE TABLE IF NOT EXISTS writer_leases (volume TEXT PRIMARY KEY, holder TEXT NOT NULL, generation INTEGER NOT NULL, granted_at INTEGER NOT NULL)');
    for (const row of db.prepare('SELECT * FROM writer_leases').all() as LeaseRow[]) {
      this.#leases.set(row.volume, { holder: row.holder === '' ? null : row.holder, generation: row.generation, grantedAt: row.granted_at });
    }
  }

  get(volume: string): WriterLease | undefined {
    return this.#leases.get(volume);
  }

  /**
   * Runs one write of `token`'s connection, or refuses it with EPERM when the
   * volume is fenced and `token` does not hold its lease. The check and the
   * count happen in the same tick, so a grant either sees this write in flight
   * or this write sees the grant's outcome.
   */
  async write<T>(volume: string, token: string | undefined, operation: () => Promise<T>): Promise<T> {
    for (let change = this.#changes.idle(volume); change; change = this.#changes.idle(volume)) await change;
    const lease = this.#leases.get(volume);
    if (lease && lease.holder !== token) {
      const who = lease.holder === null ? 'its lease was released and nobody holds it' : 'another client holds its write lease';
      throw new NbdBackendError(NbdErrno.EPERM, `volume ${volume} is fenced: ${who} (generation ${lease.generation}); this connection ${token === undefined ? 'has no writer token' : 'is not the holder'}`);
    }
    const counts = this.#inFlight.get(volume) ?? new Map<string, number>();
    this.#inFlight.set(volume, counts);
    const key = token ?? '';
    counts.set(key, (counts.get(key) ?? 0) + 1);
    try {
      return await operation();
    } finally {
      const left = (counts.get(key) ?? 1) - 1;
      if (left === 0) counts.delete(key);
      else counts.set(key, left);
    }
  }

  /**
   * Moves the lease to `holder` with the volume's next generation, once the
   * writes of everyone else have finished; on a drain timeout the old lease
   * stays and this rejects. Granting to the current holder returns its lease unchanged.
   */
  grant(volume: string, holder: string): Promise<WriterLease> {
    if (!writerTokenPattern.test(holder)) {
      return Promise.reject(new VmferryError('VMF_INVALID_ARGUMENT', `invalid writer token "${holder}": 1-100 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'`));
    }
    return this.#changes.run(volume, async () => {
      const current = this.#leases.get(volume);
      if (current?.holder === holder) return current;
      await this.#drainOthers(volume, holder);
      return this.#commit(volume, { holder, generation: (current?.generation ?? 0) + 1, grantedAt: Date.now() });
    });
  }

  /**
   * Drops the lease if `holder` still holds it; the volume stays fenced with
   * nobody allowed to write until the next grant. Resolves whether it dropped
   * it (false: another holder, already released, or never granted).
   */
  release(volume: string, holder: string): Promise<boolean> {
    return this.#changes.run(volume, () => {
      const current = this.#leases.get(volume);
      if (!current || current.holder !== holder) return Promise.resolve(false);
      this.#commit(volume, { holder: null, generation: current.generation, grantedAt: Date.now() });
      return Promise.resolve(true);
    });
  }

  forget(volume: string): void {
    this.#db.prepare('DELETE FROM writer_leases WHERE volume = ?').run(volume);
    this.#leases.delete(volume);
  }

  #commit(volume: string, lease: WriterLease): WriterLease {
    this.#db
      .prepare('INSERT OR REPLACE INTO writer_leases (volume, holder, generation, granted_at) VALUES (?, ?, ?, ?)')
      .run(volume, lease.holder ?? '', lease.generation, lease.grantedAt);
    this.#leases.set(volume, lease);
    return lease;
  }

  async #drainOthers(volume: string, holder: string): Promise<void> {
    const deadline = Date.now() + this.#drainTimeoutMs;
    for (;;) {
      const counts = this.#inFlight.get(volume);
      const others = counts ? [...counts.keys()].filter((token) => token !== holder) : [];
      if (others.length === 0) return;
      if (Date.now() > deadline) {
        throw new VmferryError(
          'VMF_TIMEOUT',
          `volume ${volume}: the writes of ${others.length} other client(s) did not finish within ${this.#drainTimeoutMs / 1000} s; the lease stays where it was`,
        );
      }
      await sleep(5);
    }
  }
}

/**
 * One writer per shared volume. A client names itself in the export name,
 * `VOLUME@TOKEN` (a token per QEMU instance, e.g. `host-b.7`); a plain `VOLUME`
 * has no token. Until a volume's first grant every connection may write (tools
 * such as qemu-img and nbdcopy, and single-host setups). Once granted, only
 * connections carrying the lease holder's token write; any other write, from
 * a stale source that still runs or a host that was never meant to write, gets
 * EPERM before it reaches the file. This is a fence against processes that
 * outlived their role, not an access control: the token is not a secret.
 *
 * Each grant carries a generation that must be higher than the last one, so a
 * delayed or replayed grant from an old orchestrator step can never win back
 * the lease. A grant returns only once every write that passed the check under
 * the old lease has finished: after it, nothing of the old writer lands.
 */
import type Database from 'better-sqlite3';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import { NbdBackendError } from '../nbd/backend.ts';
import { NbdErrno } from '../nbd/constants.ts';

export interface WriterLease {
  /** The token of the one client allowed to write. */
  holder: string;
  generation: number;
  grantedAt: number;
}

export const writerTokenPattern = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/;

/** `vol@host-b.7` → volume `vol`, token `host-b.7`; a name without `@` has no token. */
export function parseExportName(exportName: string): { volume: string; token: string | undefined } {
  const at = exportName.indexOf('@');
  if (at < 0) return { volume: exportName, token: undefined };
  return { volume: exportName.slice(0, at), token: exportName.slice(at + 1) };
}

/** How long a grant waits for the old holder's in-flight writes; they are bounded by the NBD server's limits. */
const drainTimeoutMs = 30_000;

export class WriterLeases {
  readonly #db: Database.Database;
  readonly #leases = new Map<string, WriterLease>();
  /** Writes under way per volume, by the token that made them (`''` for none). */
  readonly #inFlight = new Map<string, Map<string, number>>();

  constructor(db: Database.Database) {
    this.#db = db;
    db.exec('CREATE TABLE IF NOT EXISTS writer_leases (volume TEXT PRIMARY KEY, holder TEXT NOT NULL, generation INTEGER NOT NULL, granted_at INTEGER NOT NULL)');
    const rows = db.prepare('SELECT * FROM writer_leases').all() as { volume: string; holder: string; generation: number; granted_at: number }[];
    for (const row of rows) this.#leases.set(row.volume, { holder: row.holder, generation: row.generation, grantedAt: row.granted_at });
  }

  get(volume: string): WriterLease | undefined {
    return this.#leases.get(volume);
  }

  /**
   * Runs one write of `token`'s connection, or refuses it with EPERM when
   * another client holds the volume's lease. The check and the count happen in
   * the same tick, so a grant either sees this write in flight or this write
   * sees the grant.
   */
  async write<T>(volume: string, token: string | undefined, operation: () => Promise<T>): Promise<T> {
    const lease = this.#leases.get(volume);
    if (lease && lease.holder !== token) {
      throw new NbdBackendError(
        NbdErrno.EPERM,
        `volume ${volume} is fenced: ${lease.holder} holds its write lease (generation ${lease.generation}), this connection is ${token ?? 'anonymous'}`,
      );
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

  /** Moves the lease to `holder`; `generation` must exceed the current one. Resolves once the previous writers' writes have all finished. */
  async grant(volume: string, holder: string, generation: number): Promise<WriterLease> {
    if (!writerTokenPattern.test(holder)) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid writer token "${holder}": 1-100 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'`);
    }
    const current = this.#leases.get(volume);
    if (current && generation <= current.generation) {
      if (current.holder === holder && current.generation === generation) return current;
      throw new VmferryError(
        'VMF_CONFLICT',
        `volume ${volume}: generation ${generation} is not newer than the current lease (${current.holder}, generation ${current.generation})`,
      );
    }
    const lease: WriterLease = { holder, generation, grantedAt: Date.now() };
    this.#db
      .prepare('INSERT OR REPLACE INTO writer_leases (volume, holder, generation, granted_at) VALUES (?, ?, ?, ?)')
      .run(volume, lease.holder, lease.generation, lease.grantedAt);
    this.#leases.set(volume, lease);
    await this.#drainOthers(volume, holder);
    return lease;
  }

  forget(volume: string): void {
    this.#db.prepare('DELETE FROM writer_leases WHERE volume = ?').run(volume);
    this.#leases.delete(volume);
  }

  async #drainOthers(volume: string, holder: string): Promise<void> {
    const deadline = Date.now() + drainTimeoutMs;
    for (;;) {
      const counts = this.#inFlight.get(volume);
      const others = counts ? [...counts.entries()].filter(([token]) => token !== holder) : [];
      if (others.length === 0) return;
      if (Date.now() > deadline) {
        throw new VmferryError(
          'VMF_TIMEOUT',
          `volume ${volume}: the lease moved to ${holder}, but writes of ${others.map(([t]) => t || 'anonymous').join(', ')} did not finish within ${drainTimeoutMs / 1000} s`,
        );
      }
      await sleep(5);
    }
  }
}

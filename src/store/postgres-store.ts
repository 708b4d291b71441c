/**
 * The store for several controllers: one PostgreSQL database they share
 * (node-postgres, a small pool). Every write is one autocommitted statement,
 * so it is committed — and with synchronous_commit on, flushed to the
 * server's WAL — when its promise resolves, as with the SQLite file.
 */
import pg from 'pg';
import type { Logger } from 'pino';
import { describeError, VmferryError } from '../errors.ts';
import { finalPhases, type MigrationEvent, type MigrationPhase } from '../migration/phases.ts';
import { withConnection } from './pg-checkout.ts';
import { applySchema } from './postgres-schema.ts';
import type { DrainStatus, HostRecord, LeaseToken, MigrationRecord, Store, StoredEvent, VmLocation } from './store.ts';

/** True when `db` (a `--db` value) names a PostgreSQL database rather than a SQLite file. */
export function isPostgresUrl(db: string): boolean {
  return /^postgres(ql)?:\/\//i.test(db);
}

/** The URL without its password (in the userinfo or a `password` parameter): what messages and logs may show. */
export function redactedUrl(text: string): string {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new VmferryError('VMF_INVALID_ARGUMENT', '--db must be a SQLite file or a URL such as postgres://vmferry@10.0.0.5:5432/vmferry (got a postgres URL that does not parse)');
  }
  url.password = '';
  url.searchParams.delete('password');
  return url.toString();
}

interface HostRow {
  id: string;
  url: string;
  address: string;
  last_seen: string;
  accelerator: 'kvm' | 'tcg' | null;
  accelerator_reason: string | null;
}

function toHost(row: HostRow): HostRecord {
  return {
    id: row.id,
    url: row.url,
    address: row.address,
    lastSeen: Number(row.last_seen),
    ...(row.accelerator ? { accelerator: row.accelerator } : {}),
    ...(row.accelerator_reason !== null ? { acceleratorReason: row.accelerator_reason } : {}),
  };
}

interface MigrationRow {
  id: string;
  vm: string;
  from_host: string;
  to_host: string;
  phase: string;
  plan: MigrationRecord['plan'];
  report: MigrationRecord['report'];
  created_at: string;
  updated_at: string;
}

const migrationColumns = 'id, vm, from_host, to_host, phase, plan, report, created_at, updated_at';

function toRecord(row: MigrationRow): MigrationRecord {
  return {
    id: row.id,
    vm: row.vm,
    from: row.from_host,
    to: row.to_host,
    phase: row.phase as MigrationPhase,
    plan: row.plan,
    report: row.report,
    createdAt: Number(row.created_at),
    updatedAt: Number(row.updated_at),
  };
}

/**
 * With synchronous_commit off, the server acknowledges a commit that a crash can take back: a stored phase
 * that recovery relies on (resume-sent, say) could vanish. Refused rather than worked around, so the
 * operator decides (the setting may be there for another application of the same server).
 */
async function requireDurableCommits(client: pg.PoolClient, name: string): Promise<void> {
  const { rows } = await client.query<{ value: string }>("SELECT current_setting('synchronous_commit') AS value");
  if (rows[0]?.value === 'off') {
    throw new VmferryError('VMF_DATABASE', `${name} has synchronous_commit = off: a crash could lose a migration phase vmferry already acted on; turn it on for vmferry's database or role (ALTER ROLE … SET synchronous_commit = on)`);
  }
}

export interface PostgresStoreOptions {
  /** Where a broken idle connection is reported (the pool drops it and opens another for the next query). */
  logger?: Logger;
  /**
   * How long PostgreSQL lets a transaction of this store sit idle before it ends the session. A leader's write
   * holds the lease row until it commits, and a standby's takeover waits for that row: a leader stalled inside a
   * write (a pause, SIGSTOP, a frozen VM) would otherwise keep every standby waiting for as long as it stalls.
   */
  idleInTransactionTimeoutMs?: number;
}

/** How long opening a connection may take: a database host that drops packets fails the query, not hangs it. */
const connectTimeoutMs = 10_000;

/** The store's connection pool settings (exported for the test that stalls a transaction the way a paused leader does). */
export function storePoolConfig(url: string, options: PostgresStoreOptions): pg.PoolConfig {
  return {
    connectionString: url,
    max: 4,
    connectionTimeoutMillis: connectTimeoutMs,
    application_name: 'vmferry-controller',
    ...(options.idleInTransactionTimeoutMs === undefined ? {} : { idle_in_transaction_session_timeout: Math.max(1, Math.round(options.idleInTransactionTimeoutMs)) }),
  };
}

// Holds the lease row (FOR SHARE) until the write commits: a standby's takeover, an UPDATE of that row, waits
// for the write, and a write after the takeover finds no row. No gap between the check and the write. A write
// its controller stalls in is ended by PostgreSQL (idleInTransactionTimeoutMs), so the wait has an end.
const leaseHeldSql = 'SELECT 1 FROM vmferry_leader WHERE holder = $1 AND epoch = $2 AND expires_at > clock_timestamp() FOR SHARE';

export class PostgresStore implements Store {
  readonly #pool: pg.Pool;
  /** The URL without its password, for error messages. */
  readonly #name: string;
  /** Set on a view made by fencedBy: its writes commit only while this lease is held. */
  readonly #lease: LeaseToken | undefined;

  private constructor(pool: pg.Pool, name: string, lease?: LeaseToken) {
    this.#pool = pool;
    this.#name = name;
    this.#lease = lease;
  }

  fencedBy(lease: LeaseToken): Store {
    return new PostgresStore(this.#pool, this.#name, lease);
  }

  /** Connects to `url`, applies the schema steps the database lacks, and returns the store; a database it cannot reach is a VMF_DATABASE error naming it. */
  static async open(url: string, options: PostgresStoreOptions = {}): Promise<PostgresStore> {
    const name = redactedUrl(url);
    const pool = new pg.Pool(storePoolConfig(url, options));
    pool.on('error', (err) => options.logger?.warn({ err: describeError(err), db: name }, 'an idle database connection broke'));
    const store = new PostgresStore(pool, name);
    try {
      await withConnection(pool, async (client) => {
        await requireDurableCommits(client, name);
        await applySchema(client, name);
      });
    } catch (err) {
      await pool.end();
      throw store.#wrap(err);
    }
    return store;
  }

  #wrap(err: unknown): VmferryError {
    if (err instanceof VmferryError) return err;
    return new VmferryError('VMF_DATABASE', `database ${this.#name}: ${describeError(err) || 'connection failed'}`, { cause: err });
  }

  async #query<Row extends pg.QueryResultRow>(sql: string, values: unknown[]): Promise<pg.QueryResult<Row>> {
    try {
      return await this.#pool.query<Row>(sql, values);
    } catch (err) {
      throw this.#wrap(err);
    }
  }

  /** A write that acts for the leader: in one transaction with the lease check when this view is fenced. */
  async #write(sql: string, values: unknown[]): Promise<pg.QueryResult> {
    const lease = this.#lease;
    if (!lease) return this.#query(sql, values);
    try {
      return await withConnection(this.#pool, async (client, discard) => {
        try {
          await client.query('BEGIN');
          const held = await client.query(leaseHeldSql, [lease.holder, lease.epoch]);
          if (held.rowCount === 0) {
            throw new VmferryError('VMF_NOT_LEADER', `database ${this.#name} refused a write of ${lease.holder}: its leader lease (epoch ${lease.epoch}) has expired or passed to another controller`);
          }
          const result = await client.query(sql, values);
          await client.query('COMMIT');
          return result;
        } catch (err) {
          // A connection whose ROLLBACK failed may still be inside the transaction: it goes, not back to the pool.
          await client.query('ROLLBACK').catch((rollbackErr: unknown) => discard(rollbackErr as Error));
          throw err;
        }
      });
    } catch (err) {
      throw this.#wrap(err);
    }
  }

  async upsertHost(host: HostRecord): Promise<void> {
    await this.#query(
      'INSERT INTO hosts (id, url, address, last_seen, accelerator, accelerator_reason) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET ' +
        'url = excluded.url, address = excluded.address, last_seen = excluded.last_seen, accelerator = excluded.accelerator, accelerator_reason = excluded.accelerator_reason',
      [host.id, host.url, host.address, host.lastSeen, host.accelerator ?? null, host.acceleratorReason ?? null],
    );
  }

  async listHosts(): Promise<HostRecord[]> {
    return (await this.#query<HostRow>('SELECT * FROM hosts ORDER BY id', [])).rows.map(toHost);
  }

  async getHost(id: string): Promise<HostRecord | undefined> {
    const row = (await this.#query<HostRow>('SELECT * FROM hosts WHERE id = $1', [id])).rows[0];
    return row && toHost(row);
  }

  async setVmLocation(location: VmLocation): Promise<void> {
    await this.#write('INSERT INTO vms (name, host_id) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET host_id = excluded.host_id', [location.name, location.hostId]);
  }

  async getVmLocation(name: string): Promise<VmLocation | undefined> {
    return (await this.#query<VmLocation>('SELECT name, host_id AS "hostId" FROM vms WHERE name = $1', [name])).rows[0];
  }

  async setHostDraining(id: string, draining: boolean): Promise<void> {
    if (draining) await this.#write('INSERT INTO draining_hosts (host_id, since) VALUES ($1, $2) ON CONFLICT (host_id) DO NOTHING', [id, Date.now()]);
    else await this.#write('DELETE FROM draining_hosts WHERE host_id = $1', [id]);
  }

  async drainingHosts(): Promise<string[]> {
    return (await this.#query<{ host_id: string }>('SELECT host_id FROM draining_hosts ORDER BY host_id', [])).rows.map((r) => r.host_id);
  }

  async saveDrain(drain: DrainStatus): Promise<void> {
    await this.#write('INSERT INTO drains (id, started_at, status) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET status = excluded.status', [drain.id, drain.startedAt, JSON.stringify(drain)]);
  }

  async getDrain(id: string): Promise<DrainStatus | undefined> {
    return (await this.#query<{ status: DrainStatus }>('SELECT status FROM drains WHERE id = $1', [id])).rows[0]?.status;
  }

  async listDrains(limit: number): Promise<DrainStatus[]> {
    return (await this.#query<{ status: DrainStatus }>('SELECT status FROM drains ORDER BY started_at DESC, id LIMIT $1', [limit])).rows.map((r) => r.status);
  }

  async deleteVmLocation(name: string): Promise<void> {
    await this.#write('DELETE FROM vms WHERE name = $1', [name]);
  }

  async createMigration(record: MigrationRecord): Promise<void> {
    await this.#write('INSERT INTO migrations (id, vm, from_host, to_host, phase, plan, report, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)', [
      record.id,
      record.vm,
      record.from,
      record.to,
      record.phase,
      JSON.stringify(record.plan),
      record.report ? JSON.stringify(record.report) : null,
      record.createdAt,
      record.updatedAt,
    ]);
  }

  async updateMigration(id: string, patch: { phase?: MigrationPhase; report?: MigrationRecord['report'] }): Promise<void> {
    if (!patch.phase && !patch.report) return;
    await this.#write('UPDATE migrations SET phase = COALESCE($2, phase), report = COALESCE($3::json, report), updated_at = $4 WHERE id = $1', [
      id,
      patch.phase ?? null,
      patch.report ? JSON.stringify(patch.report) : null,
      Date.now(),
    ]);
  }

  async getMigration(id: string): Promise<MigrationRecord | undefined> {
    const row = (await this.#query<MigrationRow>(`SELECT ${migrationColumns} FROM migrations WHERE id = $1`, [id])).rows[0];
    return row && toRecord(row);
  }

  async listMigrations(limit: number): Promise<MigrationRecord[]> {
    return (await this.#query<MigrationRow>(`SELECT ${migrationColumns} FROM migrations ORDER BY created_at DESC, ord DESC LIMIT $1`, [limit])).rows.map(toRecord);
  }

  async activeMigration(vm: string): Promise<MigrationRecord | undefined> {
    const row = (await this.#query<MigrationRow>(`SELECT ${migrationColumns} FROM migrations WHERE vm = $1 AND phase <> ALL($2::text[]) ORDER BY created_at, ord LIMIT 1`, [vm, finalPhases])).rows[0];
    return row && toRecord(row);
  }

  async unfinishedMigrations(): Promise<MigrationRecord[]> {
    return (await this.#query<MigrationRow>(`SELECT ${migrationColumns} FROM migrations WHERE phase <> ALL($1::text[]) ORDER BY created_at, ord`, [finalPhases])).rows.map(toRecord);
  }

  async appendEvent(migrationId: string, event: MigrationEvent): Promise<void> {
    // One statement: the UPDATE locks the migration's row until the insert commits, so a concurrent append
    // (another request, another controller) waits, then numbers its event after this one. Events therefore
    // become visible in seq order, and a reader polling eventsSince never skips one.
    const result = await this.#write(
      'WITH next AS (UPDATE migrations SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq) ' +
        'INSERT INTO migration_events (migration_id, seq, at, event) SELECT $1, event_seq, $2, $3 FROM next',
      [migrationId, Date.now(), JSON.stringify(event)],
    );
    if (result.rowCount === 0) throw new VmferryError('VMF_NOT_FOUND', `no migration ${migrationId} to append an event to`);
  }

  async eventsSince(migrationId: string, afterSeq: number): Promise<StoredEvent[]> {
    const { rows } = await this.#query<{ seq: string; at: string; event: MigrationEvent }>(
      'SELECT seq, at, event FROM migration_events WHERE migration_id = $1 AND seq > $2 ORDER BY seq LIMIT 1000',
      [migrationId, afterSeq],
    );
    return rows.map((r) => ({ seq: Number(r.seq), at: Number(r.at), event: r.event }));
  }

  close(): Promise<void> {
    // A fenced view shares its store's pool, which its store ends.
    if (this.#lease) return Promise.resolve();
    return this.#pool.end();
  }
}

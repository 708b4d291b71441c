/**
 * The default store: one SQLite file (better-sqlite3), in WAL mode so readers
 * never block the writer, and synchronous = FULL so a commit is on disk when
 * it returns (NORMAL syncs the WAL only at checkpoints: a power cut could take
 * back the migration phase recovery relies on).
 */
import Database from 'better-sqlite3';
import { VmferryError } from '../errors.ts';
import { finalPhases, type MigrationEvent, type MigrationPhase } from '../migration/phases.ts';
import type { DrainStatus, HostRecord, MigrationRecord, Store, StoredEvent, VmLocation } from './store.ts';

const schema = `
CREATE TABLE IF NOT EXISTS hosts (
  id TEXT PRIMARY KEY, url TEXT NOT NULL, address TEXT NOT NULL, last_seen INTEGER NOT NULL, accelerator TEXT, accelerator_reason TEXT);
CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, host_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS draining_hosts (host_id TEXT PRIMARY KEY, since INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS drains (id TEXT PRIMARY KEY, started_at INTEGER NOT NULL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (
  id TEXT PRIMARY KEY, vm TEXT NOT NULL, from_host TEXT NOT NULL, to_host TEXT NOT NULL, phase TEXT NOT NULL,
  plan TEXT NOT NULL, report TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS migrations_vm ON migrations (vm, phase);
CREATE TABLE IF NOT EXISTS migration_events (
  migration_id TEXT NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL, event TEXT NOT NULL, PRIMARY KEY (migration_id, seq));
`;

/** Columns added after the first release: a database created before gets them on open. */
const addedColumns: { table: string; column: string; type: string }[] = [
  { table: 'hosts', column: 'accelerator', type: 'TEXT' },
  { table: 'hosts', column: 'accelerator_reason', type: 'TEXT' },
];

interface HostRow {
  id: string;
  url: string;
  address: string;
  lastSeen: number;
  accelerator: 'kvm' | 'tcg' | null;
  acceleratorReason: string | null;
}

const hostColumns = 'id, url, address, last_seen AS lastSeen, accelerator, accelerator_reason AS acceleratorReason';

function toHost(row: HostRow): HostRecord {
  const { accelerator, acceleratorReason, ...host } = row;
  return { ...host, ...(accelerator ? { accelerator } : {}), ...(acceleratorReason !== null ? { acceleratorReason } : {}) };
}

interface MigrationRow {
  id: string;
  vm: string;
  from_host: string;
  to_host: string;
  phase: string;
  plan: string;
  report: string | null;
  created_at: number;
  updated_at: number;
}

function toRecord(row: MigrationRow): MigrationRecord {
  return {
    id: row.id,
    vm: row.vm,
    from: row.from_host,
    to: row.to_host,
    phase: row.phase as MigrationPhase,
    plan: JSON.parse(row.plan) as MigrationRecord['plan'],
    report: row.report === null ? null : (JSON.parse(row.report) as MigrationRecord['report']),
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  };
}

export class SqliteStore implements Store {
  readonly #db: Database.Database;

  constructor(path: string) {
    this.#db = new Database(path);
    this.#db.pragma('journal_mode = WAL');
    this.#db.pragma('synchronous = FULL');
    this.#db.exec(schema);
    for (const { table, column, type } of addedColumns) {
      const columns = this.#db.prepare(`PRAGMA table_info(${table})`).all() as { name: string }[];
      if (!columns.some((c) => c.name === column)) this.#db.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${type}`);
    }
  }

  upsertHost(host: HostRecord): Promise<void> {
    this.#db
      .prepare(
        'INSERT INTO hosts (id, url, address, last_seen, accelerator, accelerator_reason) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET ' +
          'url = excluded.url, address = excluded.address, last_seen = excluded.last_seen, accelerator = excluded.accelerator, accelerator_reason = excluded.accelerator_reason',
      )
      .run(host.id, host.url, host.address, host.lastSeen, host.accelerator ?? null, host.acceleratorReason ?? null);
    return Promise.resolve();
  }

  listHosts(): Promise<HostRecord[]> {
    const rows = this.#db.prepare(`SELECT ${hostColumns} FROM hosts ORDER BY id`).all() as HostRow[];
    return Promise.resolve(rows.map(toHost));
  }

  getHost(id: string): Promise<HostRecord | undefined> {
    const row = this.#db.prepare(`SELECT ${hostColumns} FROM hosts WHERE id = ?`).get(id) as HostRow | undefined;
    return Promise.resolve(row && toHost(row));
  }

  setVmLocation(location: VmLocation): Promise<void> {
    this.#db.prepare('INSERT INTO vms (name, host_id) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET host_id = excluded.host_id').run(location.name, location.hostId);
    return Promise.resolve();
  }

  getVmLocation(name: string): Promise<VmLocation | undefined> {
    return Promise.resolve(this.#db.prepare('SELECT name, host_id AS hostId FROM vms WHERE name = ?').get(name) as VmLocation | undefined);
  }

  setHostDraining(id: string, draining: boolean): Promise<void> {
    if (draining) this.#db.prepare('INSERT INTO draining_hosts (host_id, since) VALUES (?, ?) ON CONFLICT (host_id) DO NOTHING').run(id, Date.now());
    else this.#db.prepare('DELETE FROM draining_hosts WHERE host_id = ?').run(id);
    return Promise.resolve();
  }

  drainingHosts(): Promise<string[]> {
    return Promise.resolve((this.#db.prepare('SELECT host_id AS id FROM draining_hosts ORDER BY host_id').all() as { id: string }[]).map((r) => r.id));
  }

  saveDrain(drain: DrainStatus): Promise<void> {
    this.#db.prepare('INSERT INTO drains (id, started_at, status) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status').run(drain.id, drain.startedAt, JSON.stringify(drain));
    return Promise.resolve();
  }

  getDrain(id: string): Promise<DrainStatus | undefined> {
    const row = this.#db.prepare('SELECT status FROM drains WHERE id = ?').get(id) as { status: string } | undefined;
    return Promise.resolve(row && (JSON.parse(row.status) as DrainStatus));
  }

  listDrains(limit: number): Promise<DrainStatus[]> {
    const rows = this.#db.prepare('SELECT status FROM drains ORDER BY started_at DESC, id LIMIT ?').all(limit) as { status: string }[];
    return Promise.resolve(rows.map((r) => JSON.parse(r.status) as DrainStatus));
  }

  deleteVmLocation(name: string): Promise<void> {
    this.#db.prepare('DELETE FROM vms WHERE name = ?').run(name);
    return Promise.resolve();
  }

  createMigration(record: MigrationRecord): Promise<void> {
    this.#db
      .prepare('INSERT INTO migrations (id, vm, from_host, to_host, phase, plan, report, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)')
      .run(record.id, record.vm, record.from, record.to, record.phase, JSON.stringify(record.plan), record.report ? JSON.stringify(record.report) : null, record.createdAt, record.updatedAt);
    return Promise.resolve();
  }

  updateMigration(id: string, patch: { phase?: MigrationPhase; report?: MigrationRecord['report'] }): Promise<void> {
    const now = Date.now();
    if (patch.phase) this.#db.prepare('UPDATE migrations SET phase = ?, updated_at = ? WHERE id = ?').run(patch.phase, now, id);
    if (patch.report) this.#db.prepare('UPDATE migrations SET report = ?, updated_at = ? WHERE id = ?').run(JSON.stringify(patch.report), now, id);
    return Promise.resolve();
  }

  getMigration(id: string): Promise<MigrationRecord | undefined> {
    const row = this.#db.prepare('SELECT * FROM migrations WHERE id = ?').get(id) as MigrationRow | undefined;
    return Promise.resolve(row && toRecord(row));
  }

  listMigrations(limit: number): Promise<MigrationRecord[]> {
    const rows = this.#db.prepare('SELECT * FROM migrations ORDER BY created_at DESC, rowid DESC LIMIT ?').all(limit) as MigrationRow[];
    return Promise.resolve(rows.map(toRecord));
  }

  activeMigration(vm: string): Promise<MigrationRecord | undefined> {
    const placeholders = finalPhases.map(() => '?').join(', ');
    const row = this.#db.prepare(`SELECT * FROM migrations WHERE vm = ? AND phase NOT IN (${placeholders})`).get(vm, ...finalPhases) as MigrationRow | undefined;
    return Promise.resolve(row && toRecord(row));
  }

  unfinishedMigrations(): Promise<MigrationRecord[]> {
    const placeholders = finalPhases.map(() => '?').join(', ');
    const rows = this.#db.prepare(`SELECT * FROM migrations WHERE phase NOT IN (${placeholders}) ORDER BY created_at, rowid`).all(...finalPhases) as MigrationRow[];
    return Promise.resolve(rows.map(toRecord));
  }

  appendEvent(migrationId: string, event: MigrationEvent): Promise<void> {
    if (!this.#db.prepare('SELECT 1 FROM migrations WHERE id = ?').get(migrationId)) {
      return Promise.reject(new VmferryError('VMF_NOT_FOUND', `no migration ${migrationId} to append an event to`));
    }
    this.#db
      .prepare('INSERT INTO migration_events (migration_id, seq, at, event) SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ? FROM migration_events WHERE migration_id = ?')
      .run(migrationId, Date.now(), JSON.stringify(event), migrationId);
    return Promise.resolve();
  }

  eventsSince(migrationId: string, afterSeq: number): Promise<StoredEvent[]> {
    const rows = this.#db
      .prepare('SELECT seq, at, event FROM migration_events WHERE migration_id = ? AND seq > ? ORDER BY seq LIMIT 1000')
      .all(migrationId, afterSeq) as { seq: number; at: number; event: string }[];
    return Promise.resolve(rows.map((r) => ({ seq: r.seq, at: r.at, event: JSON.parse(r.event) as MigrationEvent })));
  }

  /** A SQLite file has one controller, which always leads: nothing to fence. */
  fencedBy(): Store {
    return this;
  }

  close(): Promise<void> {
    this.#db.close();
    return Promise.resolve();
  }
}

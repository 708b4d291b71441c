/**
 * The PostgreSQL store's schema as a versioned list of steps. A controller
 * applies the steps its database lacks when it starts, all in one transaction
 * under an advisory lock, so two controllers starting at once apply each step
 * exactly once and neither sees a half-built schema.
 */
import type { PoolClient } from 'pg';
import { VmferryError } from '../errors.ts';

interface SchemaStep {
  version: number;
  sql: string;
}

/**
 * Append only: a released step is never edited, a change is a new step.
 * Times are milliseconds since the epoch, as in the SQLite store. Plans,
 * reports and events are `json`, not `jsonb`: stored verbatim (key order kept,
 * as SQLite returns them), and a NUL in a QEMU error message is accepted.
 * `migrations.ord` orders migrations created in the same millisecond by
 * insertion; `migrations.event_seq` is the last event number handed out, the
 * row lock that serialises concurrent appends to one migration.
 */
export const schemaSteps: readonly SchemaStep[] = [
  {
    version: 1,
    sql: `
CREATE TABLE hosts (
  id TEXT PRIMARY KEY, url TEXT NOT NULL, address TEXT NOT NULL, last_seen BIGINT NOT NULL, accelerator TEXT, accelerator_reason TEXT);
CREATE TABLE vms (name TEXT PRIMARY KEY, host_id TEXT NOT NULL);
CREATE TABLE migrations (
  id TEXT PRIMARY KEY, ord BIGSERIAL NOT NULL, vm TEXT NOT NULL, from_host TEXT NOT NULL, to_host TEXT NOT NULL, phase TEXT NOT NULL,
  plan JSON NOT NULL, report JSON, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, event_seq BIGINT NOT NULL DEFAULT 0);
CREATE INDEX migrations_vm ON migrations (vm, phase);
CREATE INDEX migrations_created ON migrations (created_at, ord);
CREATE TABLE migration_events (
  migration_id TEXT NOT NULL, seq BIGINT NOT NULL, at BIGINT NOT NULL, event JSON NOT NULL, PRIMARY KEY (migration_id, seq));
`,
  },
  {
    version: 2,
    // The leader lease (src/controller/leader-lease.ts): one row, its holder, its epoch, and until when, by the database's clock.
    sql: 'CREATE TABLE vmferry_leader (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, epoch BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL);',
  },
  {
    version: 3,
    // Hosts being drained (`vmferry host drain`): kept apart from `hosts`, which each heartbeat rewrites.
    sql: 'CREATE TABLE draining_hosts (host_id TEXT PRIMARY KEY, since BIGINT NOT NULL);',
  },
  {
    version: 4,
    // Host drains and their VMs' outcomes (src/controller/drain.ts), so `vmferry host drain` status outlives the controller that ran one.
    sql: 'CREATE TABLE drains (id TEXT PRIMARY KEY, started_at BIGINT NOT NULL, status JSON NOT NULL);',
  },
];

/** Any fixed number: the key of the transaction-scoped advisory lock that serialises schema upgrades ("vmfsch" in ASCII). */
const schemaLockKey = 0x766d66736368;

/** Brings the schema of `client`'s database up to the last step; `name` (the database, no password) is for messages. */
export async function applySchema(client: PoolClient, name: string): Promise<void> {
  await client.query('BEGIN');
  try {
    await client.query('SELECT pg_advisory_xact_lock($1)', [schemaLockKey]);
    await client.query('CREATE TABLE IF NOT EXISTS vmferry_schema (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)');
    const { rows } = await client.query<{ version: number }>('SELECT COALESCE(MAX(version), 0)::int AS version FROM vmferry_schema');
    const current = rows[0]?.version ?? 0;
    const latest = schemaSteps.at(-1)?.version ?? 0;
    // A controller of an older release must not write to a schema it does not know (a rolling upgrade half done).
    if (current > latest) {
      throw new VmferryError('VMF_DATABASE', `${name} has schema version ${current}, newer than this vmferry knows (${latest}): upgrade this controller`);
    }
    for (const step of schemaSteps.filter((s) => s.version > current)) {
      await client.query(step.sql);
      await client.query('INSERT INTO vmferry_schema (version, applied_at) VALUES ($1, $2)', [step.version, Date.now()]);
    }
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

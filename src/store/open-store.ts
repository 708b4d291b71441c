/** The controller's `--db`: a postgres:// URL opens the shared PostgreSQL store, anything else is a SQLite file. */
import type { Logger } from 'pino';
import { describeError, VmferryError } from '../errors.ts';
import { isPostgresUrl, PostgresStore, type PostgresStoreOptions } from './postgres-store.ts';
import { SqliteStore } from './sqlite-store.ts';
import type { Store } from './store.ts';

export async function openStore(db: string, logger?: Logger, postgres: Omit<PostgresStoreOptions, 'logger'> = {}): Promise<Store> {
  if (isPostgresUrl(db)) return PostgresStore.open(db, { ...postgres, ...(logger ? { logger } : {}) });
  // mysql://…, postgress://…: a typo, not a file to create in a directory named after it.
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(db)) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `--db must be a SQLite file or a postgres:// URL (got "${db.replace(/:[^:@/]*@/, ':…@')}")`);
  }
  try {
    return new SqliteStore(db);
  } catch (err) {
    throw new VmferryError('VMF_DATABASE', `database ${db}: ${describeError(err)}`, { cause: err });
  }
}

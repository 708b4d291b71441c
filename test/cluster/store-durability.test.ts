// The controller's store: a committed migration phase is what recovery acts
// on after a crash, so the commit must be on disk when it returns, not only
// in the WAL's page cache (SQLite's synchronous = NORMAL loses it on power loss).
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { syncedPath, traceScript } from '../support/strace.ts';
import { makeTempDir } from '../support/temp.ts';

test('a committed migration phase is fsynced to the database before the commit returns', async (t) => {
  const dir = await makeTempDir('store-sync');
  t.after(() => dir.remove());
  const db = join(dir.path, 'controller.db');
  const calls = await traceScript(join(import.meta.dirname, 'scripts/store-commit.ts'), [db], ['fsync', 'fdatasync', 'write']);
  const marker = (text: string): number => calls.findIndex((c) => c.name === 'write' && c.args.startsWith('1<') && c.args.includes(`"${text}\\n"`));
  const begin = marker('begin');
  const committed = marker('committed');
  assert.ok(begin >= 0 && committed > begin, 'the script ran to the end');
  const synced = calls.slice(begin, committed).filter((c) => c.name !== 'write' && c.result === '0').map(syncedPath);
  assert.ok(
    synced.some((path) => path === `${db}-wal` || path === db),
    `the commit synced the database or its WAL before returning (synced meanwhile: ${synced.join(', ') || 'nothing'})`,
  );
});

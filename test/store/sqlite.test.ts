// The Store contract (test/store/contract.ts) on the SQLite file, and what only
// that engine has: databases created by earlier releases.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import Database from 'better-sqlite3';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { makeTempDir } from '../support/temp.ts';
import { storeContract } from './contract.ts';

let temp: { path: string; remove(): Promise<void> };

before(async () => {
  temp = await makeTempDir('store-sqlite');
});

after(() => temp.remove());

storeContract('SQLite', (name) => Promise.resolve(new SqliteStore(join(temp.path, `${name}.db`))));

test('a database from before the accelerator columns opens, keeps its hosts, and stores the accelerator from then on', async () => {
  const path = join(temp.path, 'old.db');
  const old = new Database(path);
  old.exec('CREATE TABLE hosts (id TEXT PRIMARY KEY, url TEXT NOT NULL, address TEXT NOT NULL, last_seen INTEGER NOT NULL)');
  old.prepare('INSERT INTO hosts VALUES (?, ?, ?, ?)').run('A', 'http://10.0.0.1:10801', '10.0.0.1', 1000);
  old.close();

  const store = new SqliteStore(path);
  try {
    assert.deepEqual(await store.listHosts(), [{ id: 'A', url: 'http://10.0.0.1:10801', address: '10.0.0.1', lastSeen: 1000 }]);
    await store.upsertHost({ id: 'B', url: 'http://10.0.0.2:10801', address: '10.0.0.2', lastSeen: 2000, accelerator: 'tcg', acceleratorReason: 'KVM unusable: no /dev/kvm' });
    assert.deepEqual(await store.getHost('B'), {
      id: 'B',
      url: 'http://10.0.0.2:10801',
      address: '10.0.0.2',
      lastSeen: 2000,
      accelerator: 'tcg',
      acceleratorReason: 'KVM unusable: no /dev/kvm',
    });
  } finally {
    await store.close();
  }
  // Opened again: the columns are there, nothing is added twice.
  const again = new SqliteStore(path);
  try {
    assert.equal((await again.listHosts()).length, 2);
  } finally {
    await again.close();
  }
});

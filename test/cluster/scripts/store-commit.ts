// Opens the controller's store at DB_PATH, then commits a migration's phase
// between two lines on stdout ("begin", "committed"): what the kernel was
// asked to sync between them is what that commit is worth after a power cut.
import { SqliteStore } from '../../../src/store/sqlite-store.ts';
import type { MigrationRecord } from '../../../src/store/store.ts';

const store = new SqliteStore(process.argv[2] as string);
const now = Date.now();
await store.createMigration({ id: 'm1', vm: 'web', from: 'A', to: 'B', phase: 'pending', plan: {} as MigrationRecord['plan'], report: null, createdAt: now, updatedAt: now });
process.stdout.write('begin\n');
await store.updateMigration('m1', { phase: 'completed' });
process.stdout.write('committed\n');
await store.close();

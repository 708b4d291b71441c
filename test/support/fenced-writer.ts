/**
 * A program that writes through a fenced PostgresStore in a loop, as a leading controller does, and prints
 * `<written> <failed>` after each write: test/store/pg-checkout.test.ts stops it (SIGSTOP) inside its writes.
 *
 *   node --import tsx test/support/fenced-writer.ts <database URL> <idle-in-transaction timeout ms>
 */
import { PostgresStore } from '../../src/store/postgres-store.ts';

const [url, idleMs] = process.argv.slice(2);
if (!url || !idleMs) throw new Error('usage: fenced-writer.ts <database URL> <idle-in-transaction timeout ms>');
const store = await PostgresStore.open(url, { idleInTransactionTimeoutMs: Number(idleMs) });
// The test made this the leader's row: held for an hour, so a stop never costs the lease itself.
const fenced = store.fencedBy({ holder: 'writer', epoch: 7 });
let written = 0;
let failed = 0;
const deadline = Date.now() + 60_000;
for (let i = 0; Date.now() < deadline; i++) {
  await fenced.setVmLocation({ name: 'vm', hostId: `host-${i % 10}` }).then(
    () => written++,
    () => failed++,
  );
  process.stdout.write(`${written} ${failed}\n`);
}
await store.close();

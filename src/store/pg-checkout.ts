/**
 * A connection taken out of a pg pool for several statements. While it sits
 * between them (a transaction open, its process busy or stopped), PostgreSQL
 * may end its session: idle_in_transaction_session_timeout, a restart, an
 * operator's pg_terminate_backend. pg reports that as an 'error' event on the
 * client when no query is running, and the pool listens for it only while the
 * connection is idle in the pool: a taken-out client without a listener of its
 * own crashes the process (a controller woken from SIGSTOP did,
 * test/store/pg-checkout.test.ts). Here it gets one; its next statement then
 * fails with the reason, and it goes back to the pool as broken.
 */
import type pg from 'pg';

/**
 * Runs `work` on a connection of `pool`. `discard` marks the connection as not to be reused (a ROLLBACK that
 * failed may leave it inside the transaction); one PostgreSQL ended is discarded on its own.
 */
export async function withConnection<T>(pool: pg.Pool, work: (client: pg.PoolClient, discard: (why: Error) => void) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let broken: Error | undefined;
  const discard = (why: Error): void => {
    broken ??= why;
  };
  client.on('error', discard);
  try {
    return await work(client, discard);
  } finally {
    // A broken connection is closed by the pool, and may still report its socket's end: it keeps the listener.
    if (!broken) client.off('error', discard);
    client.release(broken);
  }
}

// For a test file whose tests each open an NBD server and raw connections: both are closed after every test,
// whether it passed or not, so a failed test leaves no listener or socket to the next.
import { afterEach } from 'node:test';
import type { NbdServer } from '../../src/nbd/server.ts';
import type { RawNbdConnection } from './raw-nbd.ts';

export interface NbdTeardown {
  /** Raw connections to close after the test. */
  raws: RawNbdConnection[];
  /** The server to close after the test (undefined once the test closed it itself); returns it. */
  serving: <T extends NbdServer | undefined>(server: T) => T;
}

export function closeAfterEachTest(): NbdTeardown {
  const raws: RawNbdConnection[] = [];
  let running: NbdServer | undefined;
  afterEach(async () => {
    for (const raw of raws.splice(0)) raw.close();
    await running?.close(1_000);
    running = undefined;
  });
  return {
    raws,
    serving: (server) => {
      running = server;
      return server;
    },
  };
}

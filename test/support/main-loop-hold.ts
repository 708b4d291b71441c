/**
 * Holds a running QEMU's main loop, as a vCPU of a post-copy destination does
 * when it faults on a page a cut stream never brought while it holds the big
 * lock (docs/QEMU-TCG-PRECOPY.md, "Post-copy"). QEMU 7.2 opens an NBD node
 * synchronously: a `blockdev-add` to a server that accepts and then says
 * nothing keeps the main loop, and with it every in-band QMP command, until the
 * server lets go. Out-of-band commands still answer.
 */
import { createServer, type Socket } from 'node:net';
import type { QmpClient } from '../../src/qmp/client.ts';

export interface MainLoopHold {
  /** Closes the silent server's connections: QEMU's open fails and its main loop runs again. */
  release(): Promise<void>;
}

export async function holdMainLoop(qmp: QmpClient, host: string): Promise<MainLoopHold> {
  const sockets = new Set<Socket>();
  const silent = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve, reject) => {
    silent.once('error', reject);
    silent.listen({ host, port: 0 }, resolve);
  });
  const address = silent.address();
  if (address === null || typeof address === 'string') throw new Error('the silent NBD server has no port');
  const connected = new Promise<void>((resolve) => silent.once('connection', () => resolve()));
  // It fails once released (the server hangs up during the handshake): that failure is the release, not an error.
  const opening = qmp
    .execute('blockdev-add', { driver: 'nbd', 'node-name': 'vmf-test-hold', export: 'hold', server: { type: 'inet', host, port: String(address.port) } }, { timeoutMs: 600_000 })
    .catch(() => undefined);
  await connected;
  return {
    async release() {
      silent.close();
      for (const socket of sockets) socket.destroy();
      await opening;
    },
  };
}

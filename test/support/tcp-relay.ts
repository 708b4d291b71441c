/**
 * A TCP relay standing in for the link between two hosts of a one-machine
 * test: a migration stream sent through it can be cut mid-flight. `cut()`
 * resets every connection through it (both QEMUs see the stream break) and
 * refuses new ones.
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net';

export class TcpRelay {
  readonly port: number;
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  #cut = false;

  private constructor(server: Server, port: number) {
    this.#server = server;
    this.port = port;
  }

  /** Listens on a free port of `host` and relays each connection to `host:targetPort`. */
  static async start(host: string, targetPort: number): Promise<TcpRelay> {
    const server = createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port: 0 }, resolve);
    });
    const address = server.address();
    if (address === null || typeof address === 'string') throw new Error('the relay has no port');
    const relay = new TcpRelay(server, address.port);
    server.on('connection', (inbound) => relay.#relay(inbound, host, targetPort));
    return relay;
  }

  /** Resets every connection through the relay and refuses new ones. */
  cut(): void {
    this.#cut = true;
    for (const socket of this.#sockets) socket.resetAndDestroy();
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  #relay(inbound: Socket, host: string, port: number): void {
    if (this.#cut) {
      inbound.resetAndDestroy();
      return;
    }
    const outbound = createConnection({ host, port });
    for (const [socket, peer] of [
      [inbound, outbound],
      [outbound, inbound],
    ] as const) {
      this.#sockets.add(socket);
      socket.pipe(peer);
      // A reset on one side resets the other, as a broken link does for both ends.
      socket.on('error', () => peer.resetAndDestroy());
      socket.on('close', () => {
        this.#sockets.delete(socket);
        peer.destroy();
      });
    }
  }
}

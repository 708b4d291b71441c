/**
 * An NBD server: accepts connections on TCP and/or a unix socket, runs the
 * handshake and then transmission for each, and keeps serving everyone else
 * whatever one client does.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { rm } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { ExportProvider } from './backend.ts';
import { NbdChannel, TlsHandshakeError, type NbdServerTls } from './channel.ts';
import { negotiate } from './handshake.ts';
import { BufferPool } from './buffer-pool.ts';
import { MemoryBudget, type BudgetAccount } from './memory-budget.ts';
import { ReusedBufferReader } from './reused-buffer-reader.ts';
import { ConnectionClosedError } from './socket-reader.ts';
import { serveTransmission, type TransmissionLimits } from './transmission.ts';

export interface ConnectionInfo {
  id: number;
  client: string;
  /** Who the client's certificate says it is (with TLS), once verified. */
  peer?: string;
  export: string | undefined;
  connectedAt: number;
}

export interface ServerLimits extends TransmissionLimits {
  /**
   * Bytes of READ/WRITE requests in flight plus read replies not yet sent,
   * summed over every connection (see memory-budget.ts). Past it, connections
   * stop reading new requests until some is given back.
   */
  memoryBudgetBytes: number;
}

export const defaultLimits: ServerLimits = {
  minimum: 1,
  preferred: 4096,
  maximum: 32 * 1024 * 1024,
  maxInFlightRequests: 64,
  maxInFlightBytes: 32 * 1024 * 1024,
  maxQueuedReplyBytes: 16 * 1024 * 1024,
  memoryBudgetBytes: 256 * 1024 * 1024,
};

/**
 * Input a connection reads ahead of the request it is working on. Small, since
 * it is outside the memory budget: a connection waiting for budget stops
 * reading at this point. A payload being read is paid for first and may exceed it.
 */
const readAheadBytes = 256 * 1024;

/** What a connection's pending read rejects with when the server shuts down. */
export class ServerShutdownError extends Error {
  constructor() {
    super('the NBD server is shutting down');
    this.name = 'ServerShutdownError';
  }
}

/** Ends a socket after its queued replies are sent; destroys it if the peer does not close within a second. */
function endSocket(socket: Socket): Promise<void> {
  if (socket.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => socket.destroy(), 1_000);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.end();
  });
}

/** How long a client may take over the handshake before it is dropped. */
const handshakeTimeoutMs = 30_000;

export class NbdServer {
  readonly #exports: ExportProvider;
  readonly #logger: Logger;
  readonly #limits: TransmissionLimits;
  readonly #budget: MemoryBudget;
  readonly #buffers: BufferPool;
  readonly #servers: Server[] = [];
  readonly #tls: NbdServerTls | undefined;
  readonly #connections = new Map<number, { info: ConnectionInfo; channel: NbdChannel; budget: BudgetAccount; done: Promise<void> }>();
  #nextId = 1;
  #closing = false;

  /** With `tls`, every client must start TLS and show a certificate (channel.ts, handshake.ts), on every listener. */
  constructor(exports: ExportProvider, logger: Logger, limits: ServerLimits = defaultLimits, tls?: NbdServerTls) {
    this.#exports = exports;
    this.#logger = logger;
    this.#limits = limits;
    this.#budget = new MemoryBudget(limits.memoryBudgetBytes);
    // Idle buffers kept for the next requests, on top of the budget: an eighth of it, at most 32 MiB.
    this.#buffers = new BufferPool(Math.min(32 * 1024 * 1024, Math.floor(limits.memoryBudgetBytes / 8)));
    this.#tls = tls;
  }

  /** Listens on TCP; resolves with the bound port (useful with port 0). */
  async listenTcp(host: string, port: number): Promise<number> {
    const server = this.#createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port }, () => resolve());
    });
    const address = server.address();
    return typeof address === 'object' && address ? address.port : port;
  }

  async listenUnix(path: string): Promise<void> {
    await rm(path, { force: true });
    const server = this.#createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
  }

  connections(): ConnectionInfo[] {
    return [...this.#connections.values()].map((c) => ({ ...c.info }));
  }

  /** The server-wide memory budget right now: its size, what connections hold, how many wait for it. */
  memoryBudget(): { capacityBytes: number; usedBytes: number; waitingConnections: number } {
    const { capacityBytes, usedBytes, waitingConnections } = this.#budget;
    return { capacityBytes, usedBytes, waitingConnections };
  }

  /**
   * Stops accepting, stops reading new requests, lets the requests in flight
   * finish and send their replies, then closes every connection. Clients still
   * there after `graceMs` are cut off.
   */
  async close(graceMs = 5_000): Promise<void> {
    // net.Server.close() calls back only once every connection has gone, so it is awaited last.
    const listenersClosed = Promise.all(this.#servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
    this.#closing = true;
    for (const connection of this.#connections.values()) {
      connection.channel.cancel(new ServerShutdownError());
      connection.budget.cancel(new ServerShutdownError());
    }
    const timer = setTimeout(() => {
      for (const connection of this.#connections.values()) connection.channel.destroy();
    }, graceMs);
    await Promise.allSettled([...this.#connections.values()].map((c) => c.done));
    clearTimeout(timer);
    await listenersClosed;
  }

  #createServer(): Server {
    // Without TLS, sockets arrive unread so that they can be read into reused buffers (reused-buffer-reader.ts);
    // a TLS socket reads its own input, so with TLS (every client must start it) they are read as Node reads them.
    const server = createServer({ noDelay: true, pauseOnConnect: !this.#tls }, (socket) => this.#accept(socket));
    server.on('error', (err) => this.#logger.error({ err }, 'NBD listener error'));
    this.#servers.push(server);
    return server;
  }

  #accept(accepted: Socket): void {
    if (this.#closing) {
      accepted.destroy();
      return;
    }
    const reader = this.#tls ? undefined : new ReusedBufferReader(readAheadBytes, this.#buffers);
    const adopted = reader?.adopt(accepted);
    // Where it cannot be adopted, the socket is read as Node reads it (paused on accept, it starts at the first read).
    const channel = reader && adopted ? new NbdChannel(adopted, readAheadBytes, reader) : new NbdChannel(accepted, readAheadBytes);
    const { socket } = channel;
    const id = this.#nextId++;
    const client = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : `unix#${id}`;
    const info: ConnectionInfo = { id, client, export: undefined, connectedAt: Date.now() };
    const log = this.#logger.child({ connection: id, client });
    socket.on('error', () => undefined);
    const budget = this.#budget.account();
    const done = this.#serve(channel, budget, info, log).finally(() =>
      endSocket(channel.socket).finally(() => {
        budget.close();
        this.#connections.delete(id);
      }),
    );
    this.#connections.set(id, { info, channel, budget, done });
  }

  async #serve(channel: NbdChannel, budget: BudgetAccount, info: ConnectionInfo, log: Logger): Promise<void> {
    const handshakeTimer = setTimeout(() => {
      log.warn('NBD handshake timed out');
      channel.destroy();
    }, handshakeTimeoutMs);
    try {
      const session = await negotiate(channel, this.#exports, this.#limits, info.client, log, this.#tls).finally(() => clearTimeout(handshakeTimer));
      if (!session) return;
      info.export = session.exportName;
      if (session.peer !== undefined) info.peer = session.peer;
      log.info({ export: session.exportName, structured: session.structuredReplies, peer: session.peer }, 'NBD client attached');
      try {
        await serveTransmission(channel.reader, channel.socket, session, this.#limits, budget, this.#buffers, log);
      } finally {
        this.#exports.release(session.exportName, info.client);
        log.info({ export: session.exportName }, 'NBD client detached');
      }
    } catch (err) {
      if (err instanceof ServerShutdownError) {
        log.info('NBD connection closed: the server is shutting down');
        return;
      }
      if (err instanceof TlsHandshakeError) {
        log.warn({ problem: err.message }, 'NBD client refused at the TLS handshake');
        return;
      }
      if (err instanceof ConnectionClosedError) {
        log.debug('NBD connection closed by the client');
        return;
      }
      log.error({ err }, 'NBD connection failed');
    }
  }
}

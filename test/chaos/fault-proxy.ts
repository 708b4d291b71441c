/**
 * An HTTP proxy in front of one agent that forwards every request unchanged,
 * except the one armed route whose reply it loses (the request reaches the
 * agent and runs to its end, then the caller's connection is reset) or
 * delivers late. The agent advertises the proxy's URL (`--advertise-url`),
 * so the controller talks to it through the proxy.
 */
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export interface ReplyFault {
  /** The end of the request's path, e.g. "/destination/resume". */
  route: string;
  /**
   * lost: the agent answers, the caller never hears it; late: the answer arrives delayMs after the agent gave it;
   * reset: the caller's connection is reset before the request reaches the agent (any method, e.g. a GET status poll).
   */
  mode: 'lost' | 'late' | 'reset';
  delayMs: number;
}

export class FaultProxy {
  readonly url: string;
  readonly #server: Server;
  readonly #target: URL;
  #armed: ReplyFault | undefined;
  /** When the armed fault hit a reply, and which request it was. */
  fired: { at: number; path: string } | undefined;

  private constructor(server: Server, target: URL) {
    this.#server = server;
    this.#target = target;
    const { address, port } = server.address() as AddressInfo;
    this.url = `http://${address}:${port}`;
  }

  /** Listens on `host` (a free port) and forwards to `target`. */
  static async start(target: string, host: string): Promise<FaultProxy> {
    const server = createServer();
    // Migration waits (wait-incoming, milestones) last as long as a phase: no server-side time limit.
    server.requestTimeout = 0;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port: 0 }, resolve);
    });
    const proxy = new FaultProxy(server, new URL(target));
    server.on('request', (req, res) => proxy.#forward(req, res));
    return proxy;
  }

  /** Arms one fault: the next reply on that route is lost or late; later ones pass. */
  arm(fault: ReplyFault): void {
    this.#armed = fault;
    this.fired = undefined;
  }

  disarm(): void {
    this.#armed = undefined;
  }

  #forward(req: IncomingMessage, res: ServerResponse): void {
    const armed = this.#armed;
    if (armed?.mode === 'reset' && req.url?.split('?')[0]?.endsWith(armed.route)) {
      this.#armed = undefined;
      this.fired = { at: Date.now(), path: req.url };
      req.socket.resetAndDestroy();
      return;
    }
    const upstream = httpRequest(
      { host: this.#target.hostname, port: this.#target.port, method: req.method, path: req.url, headers: req.headers, agent: false },
      (reply) => {
        const fault = this.#armed;
        if (fault && req.method === 'POST' && req.url?.endsWith(fault.route)) {
          this.#armed = undefined;
          this.fired = { at: Date.now(), path: req.url };
          void this.#misdeliver(fault, reply, res);
          return;
        }
        res.writeHead(reply.statusCode ?? 502, reply.headers);
        reply.pipe(res);
      },
    );
    // An agent that is down or dies mid-request looks to the caller as it would without the proxy: a dropped connection.
    upstream.on('error', () => res.destroy());
    res.on('close', () => {
      if (!res.writableFinished) upstream.destroy();
    });
    req.pipe(upstream);
  }

  async #misdeliver(fault: ReplyFault, reply: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    try {
      for await (const chunk of reply) chunks.push(chunk as Buffer);
    } catch {
      res.destroy();
      return;
    }
    if (fault.mode === 'lost') {
      res.destroy();
      return;
    }
    await sleep(fault.delayMs);
    if (res.destroyed) return;
    res.writeHead(reply.statusCode ?? 502, reply.headers);
    res.end(Buffer.concat(chunks));
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    await new Promise((resolve) => this.#server.close(resolve));
  }
}

/**
 * The proxy behind `vmferry dashboard` (dashboard.ts): the controller's web dashboard for a browser that holds
 * no client certificate. A proxy on this machine's loopback presents the
 * operator's certificate to the controller (mutual TLS, the server checked to
 * be a controller of the cluster's CA) and passes the dashboard's requests and
 * event streams through. Only the browser given the printed URL gets in: it
 * carries a random token, traded at once for a cookie; a request without it,
 * or naming another host (DNS rebinding), is refused.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { describeError } from '../errors.ts';
import { dispatcherFor, undici } from '../http/errors.ts';
import type { TlsIdentity } from '../security/tls-files.ts';

const cookieName = 'vmferry-dashboard';
/** Headers passed on each way; nothing else (no cookie of ours to the controller, no hop-by-hop header). */
const requestHeaders = ['accept', 'content-type', 'last-event-id'];
const responseHeaders = ['content-type', 'cache-control', 'content-security-policy', 'location', 'x-accel-buffering'];

export interface DashboardProxy {
  /** The URL to open, with its token. */
  url: string;
  close(): Promise<void>;
}

function sameToken(given: string | undefined, token: string): boolean {
  return given !== undefined && given.length === token.length && timingSafeEqual(Buffer.from(given), Buffer.from(token));
}

function cookie(req: IncomingMessage): string | undefined {
  for (const part of (req.headers.cookie ?? '').split(';')) {
    const [name, value] = part.trim().split('=');
    if (name === cookieName) return value;
  }
  return undefined;
}

function refuse(res: ServerResponse, status: number, message: string): void {
  res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8' }).end(`${message}\n`);
}

export async function startDashboardProxy(options: { controllerUrl: string; tls: TlsIdentity | undefined; listen: { host: string; port: number } }): Promise<DashboardProxy> {
  const token = randomBytes(24).toString('base64url');
  const dispatcher = options.tls ? dispatcherFor(options.tls, { role: 'controller' }) : undefined;
  let origin = '';
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', origin);
    if (req.headers.host !== url.host) return refuse(res, 403, `this proxy answers to ${url.host} only`);
    const given = url.searchParams.get('token') ?? undefined;
    if (sameToken(given, token)) {
      url.searchParams.delete('token');
      res.writeHead(303, { location: `${url.pathname}${url.search}`, 'set-cookie': `${cookieName}=${token}; HttpOnly; SameSite=Strict; Path=/` }).end();
      return;
    }
    if (!sameToken(cookie(req), token)) return refuse(res, 403, 'open the URL `vmferry dashboard` printed: it carries the token that lets this browser in');
    const upstream = new AbortController();
    res.on('close', () => upstream.abort());
    const headers = Object.fromEntries(requestHeaders.flatMap((name) => (typeof req.headers[name] === 'string' ? [[name, req.headers[name]]] : [])));
    const hasBody = req.method !== 'GET' && req.method !== 'HEAD';
    undici().request(new URL(`${url.pathname}${url.search}`, options.controllerUrl), {
      method: req.method as 'GET',
      headers,
      body: hasBody ? req : null,
      signal: upstream.signal,
      ...(dispatcher ? { dispatcher } : {}),
      // An event stream is silent between keep-alives (15 s) and lasts as long as the controller keeps it.
      bodyTimeout: 60_000,
    })
      .then((answer) => {
        const passed = Object.fromEntries(responseHeaders.flatMap((name) => (answer.headers[name] === undefined ? [] : [[name, answer.headers[name]]])));
        res.writeHead(answer.statusCode, passed);
        res.flushHeaders();
        answer.body.pipe(res);
        answer.body.on('error', () => res.destroy());
      })
      .catch((err: unknown) => {
        if (upstream.signal.aborted) return;
        if (res.headersSent) res.destroy();
        else refuse(res, 502, `the controller at ${options.controllerUrl} did not answer: ${describeError(err)}`);
      });
  });
  server.listen(options.listen.port, options.listen.host);
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  const host = options.listen.host.includes(':') ? `[${options.listen.host}]` : options.listen.host;
  origin = `http://${host}:${port}`;
  return {
    url: `${origin}/ui/?token=${token}`,
    close: async () => {
      server.closeAllConnections();
      server.close();
      await once(server, 'close');
    },
  };
}

/**
 * Errors across HTTP: a VmferryError leaves a server as `{code, message}` with
 * a fitting status, and the client turns it back into a VmferryError with the
 * same code, so scripts see the same codes locally and remotely.
 */
import type { FastifyError, FastifyInstance } from 'fastify';
import { createRequire } from 'node:module';
import { checkServerIdentity, type PeerCertificate } from 'node:tls';
import type { Agent, Response } from 'undici';
import { identityFromSubjectAltName, identityUri, type Role } from '../security/identity.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import { errorCodes, httpStatus, VmferryError, type ErrorCode } from '../errors.ts';
import { timeoutSignal } from '../util/abort.ts';

/**
 * Fastify's default validator silently drops unknown properties; a typo in a
 * request field must be an error instead, so every server uses these options.
 */
export const strictValidation = { customOptions: { removeAdditional: false, coerceTypes: 'array' as const, allErrors: false } };

export interface ErrorBody {
  code: string;
  message: string;
}

/** Installs the error handler that writes every error as an ErrorBody. */
export function installErrorHandler(app: FastifyInstance): void {
  app.setErrorHandler((err: FastifyError | VmferryError | Error, request, reply) => {
    if (err instanceof VmferryError) {
      const status = httpStatus(err.code);
      if (status >= 500) request.log.error({ err }, err.message);
      void reply.status(status).send({ code: err.code, message: err.message } satisfies ErrorBody);
      return;
    }
    const fastifyError = err as FastifyError;
    if (fastifyError.validation) {
      // "body/spec/memoryMiB must be integer": the schema error names the field.
      void reply.status(400).send({ code: 'VMF_INVALID_ARGUMENT', message: `invalid request: ${fastifyError.message}` });
      return;
    }
    if (fastifyError.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
      // fastify's own message is a bare "Unsupported Media Type": say which type, and what to send.
      const type = request.headers['content-type'] ?? '(none)';
      void reply.status(415).send({ code: 'VMF_INVALID_ARGUMENT', message: `unsupported content-type "${type.slice(0, 100)}": send the body as application/json` });
      return;
    }
    const status = fastifyError.statusCode ?? 500;
    if (status >= 500) request.log.error({ err }, 'request failed');
    void reply.status(status).send({ code: status >= 500 ? 'VMF_INTERNAL' : 'VMF_INVALID_ARGUMENT', message: err.message });
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({ code: 'VMF_NOT_FOUND', message: `no route ${request.method} ${request.url}` });
  });
}

function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && code in errorCodes;
}

export interface RequestOptions {
  body?: unknown;
  signal?: AbortSignal;
  timeoutMs?: number;
  /** Present this certificate and trust only this CA (an https:// URL of a vmferry server with mutual TLS). */
  tls?: TlsIdentity | undefined;
  /** With tls: who the server must be, from its certificate (the agent of host A, not another host's). */
  server?: ExpectedServer | undefined;
  /** Extra request headers (a leader's epoch: src/agent/leader-epoch.ts). */
  headers?: Record<string, string> | undefined;
}

export interface ExpectedServer {
  role: Role;
  /** Any id of that role when absent. */
  id?: string;
}

const load = createRequire(import.meta.url);

/**
 * undici, required at the first request rather than imported: it is about a hundred modules, and a
 * command that sends nothing (--help, --version, a daemon's argument error) starts faster without them.
 */
export function undici(): typeof import('undici') {
  return load('undici') as typeof import('undici');
}

/**
 * One connection pool per identity and expected server, so a client keeps its
 * TLS sessions open across requests. undici's own fetch with its own Agent:
 * the fetch built into Node is another copy of undici, and the two must not be mixed.
 */
const dispatchers = new WeakMap<TlsIdentity, Map<string, Agent>>();

export function dispatcherFor(tls: TlsIdentity, server: ExpectedServer | undefined): Agent {
  let byServer = dispatchers.get(tls);
  if (!byServer) {
    byServer = new Map();
    dispatchers.set(tls, byServer);
  }
  const key = server ? `${server.role}:${server.id ?? '*'}` : '';
  let agent = byServer.get(key);
  if (!agent) {
    agent = new (undici().Agent)({ connect: { ca: tls.ca, cert: tls.cert, key: tls.key, checkServerIdentity: (host: string, cert: PeerCertificate) => serverIdentityError(host, cert, server) } });
    byServer.set(key, agent);
  }
  return agent;
}

/** The address check TLS always makes, then the role and id the caller expects of the server. */
function serverIdentityError(host: string, cert: PeerCertificate, server: ExpectedServer | undefined): Error | undefined {
  const addressError = checkServerIdentity(host, cert);
  if (addressError || !server) return addressError;
  const found = identityFromSubjectAltName(cert.subjectaltname);
  if (found && found.role === server.role && (server.id === undefined || found.id === server.id)) return undefined;
  const wanted = server.id === undefined ? `a ${server.role}` : identityUri({ role: server.role, id: server.id });
  return new Error(`the server at ${host} is ${found ? identityUri(found) : 'no vmferry identity'}, not ${wanted}`);
}

/** A JSON request to a vmferry server; a failure is a VmferryError carrying the server's code. */
export async function requestJson<T>(baseUrl: string, method: string, path: string, options: RequestOptions = {}): Promise<T> {
  const url = new URL(path, baseUrl);
  // Its reason is a VMF_TIMEOUT: a body still arriving when it fires rejects with that, not a DOMException.
  const timeout = timeoutSignal(`${method} ${url.href}`, options.timeoutMs ?? 30_000);
  const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  let response: Response;
  try {
    response = await undici().fetch(url, {
      method,
      ...(options.tls ? { dispatcher: dispatcherFor(options.tls, options.server) } : {}),
      signal,
      headers: { ...options.headers, ...(options.body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: options.body === undefined ? null : JSON.stringify(options.body),
    });
  } catch (err) {
    if (options.signal?.aborted) throw options.signal.reason instanceof Error ? options.signal.reason : err;
    if (timeout.aborted) throw new VmferryError('VMF_TIMEOUT', `${method} ${url.href} did not answer within ${options.timeoutMs ?? 30_000} ms`, { cause: err });
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    const reason = cause?.code ?? cause?.message ?? (err as Error).message;
    // The usual cause of a certificate error: a command run without the cluster's certificates.
    const hint = url.protocol === 'https:' && !options.tls ? ' (a vmferry server with TLS: give --pki-dir, or --cert/--key/--ca)' : '';
    throw new VmferryError('VMF_UNREACHABLE', `cannot reach ${url.origin}: ${reason}${hint}`, { cause: err });
  }
  let text: string;
  try {
    text = await response.text();
  } catch (err) {
    if (signal.aborted) throw err;
    // The connection closed while the reply came: the server may have acted, the caller cannot know its answer.
    throw new VmferryError('VMF_UNREACHABLE', `the reply from ${url.origin} to ${method} ${url.pathname} was cut off: ${(err as Error).message}`, { cause: err });
  }
  let body: unknown;
  try {
    body = text.length ? JSON.parse(text) : undefined;
  } catch {
    body = undefined;
  }
  if (!response.ok) {
    const error = body as Partial<ErrorBody> | undefined;
    // A 503 without a vmferry code is a server closing or restarting, not a fault of its own.
    const code = isErrorCode(error?.code) ? error.code : response.status === 503 ? 'VMF_UNREACHABLE' : 'VMF_INTERNAL';
    throw new VmferryError(code, error?.message ?? `${method} ${url.pathname} failed with HTTP ${response.status}`);
  }
  return body as T;
}

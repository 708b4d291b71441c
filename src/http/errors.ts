/**
 * Errors across HTTP: a VmferryError leaves a server as `{code, message}` with
 * a fitting status, and the client turns it back into a VmferryError with the
 * same code, so scripts see the same codes locally and remotely.
 */
import type { FastifyError, FastifyInstance } from 'fastify';
import { errorCodes, VmferryError, type ErrorCode } from '../errors.ts';

const statusByCode: Partial<Record<ErrorCode, number>> = {
  VMF_INVALID_SPEC: 400,
  VMF_INVALID_ARGUMENT: 400,
  VMF_NOT_FOUND: 404,
  VMF_VOLUME_NOT_FOUND: 404,
  VMF_VOLUME_EXISTS: 409,
  VMF_CONFLICT: 409,
  VMF_MIGRATION_REFUSED: 409,
  VMF_NETWORK: 409,
  VMF_UNREACHABLE: 502,
  VMF_TIMEOUT: 504,
};

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
      const status = statusByCode[err.code] ?? 500;
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
}

/** A JSON request to a vmferry server; a failure is a VmferryError carrying the server's code. */
export async function requestJson<T>(baseUrl: string, method: string, path: string, options: RequestOptions = {}): Promise<T> {
  const url = new URL(path, baseUrl);
  const timeout = AbortSignal.timeout(options.timeoutMs ?? 30_000);
  const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  let response: Response;
  try {
    response = await fetch(url, {
      method,
      signal,
      headers: options.body === undefined ? {} : { 'content-type': 'application/json' },
      body: options.body === undefined ? null : JSON.stringify(options.body),
    });
  } catch (err) {
    if (options.signal?.aborted) throw options.signal.reason instanceof Error ? options.signal.reason : err;
    if (timeout.aborted) throw new VmferryError('VMF_TIMEOUT', `${method} ${url.href} did not answer within ${options.timeoutMs ?? 30_000} ms`, { cause: err });
    const reason = (err as { cause?: { code?: string } }).cause?.code ?? (err as Error).message;
    throw new VmferryError('VMF_UNREACHABLE', `cannot reach ${url.origin}: ${reason}`, { cause: err });
  }
  const text = await response.text();
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

/**
 * Reads a server-sent event stream of a vmferry server (the controller's
 * event-stream.ts) with the same TLS checks as requestJson: the messages as
 * they come, until the server ends the stream. A stream silent for longer
 * than the server's keep-alive allows is taken as dead.
 */
import { createParser, type EventSourceMessage } from 'eventsource-parser';
import { errorCodes, VmferryError, type ErrorCode } from '../errors.ts';
import { dispatcherFor, undici, type RequestOptions } from './errors.ts';

/** Three of the server's 15 s keep-alives missed. */
const silentMs = 45_000;
const connectMs = 30_000;

export async function* readEventStream(baseUrl: string, path: string, options: Pick<RequestOptions, 'tls' | 'server'> & { signal: AbortSignal }): AsyncGenerator<EventSourceMessage> {
  const url = new URL(path, baseUrl);
  const silence = new AbortController();
  // A watchdog only: unref'd, so a stream its reader dropped unfinished does not keep the process alive.
  const watch = (ms: number): NodeJS.Timeout => setTimeout(() => silence.abort(new VmferryError('VMF_TIMEOUT', `${url.href} sent nothing for ${ms / 1000} s`)), ms).unref();
  let timer = watch(connectMs);
  const quiet = (): void => {
    clearTimeout(timer);
    timer = watch(silentMs);
  };
  const signal = AbortSignal.any([options.signal, silence.signal]);
  try {
    let response;
    try {
      response = await undici().fetch(url, { headers: { accept: 'text/event-stream' }, signal, ...(options.tls ? { dispatcher: dispatcherFor(options.tls, options.server) } : {}) });
    } catch (err) {
      if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : err;
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      throw new VmferryError('VMF_UNREACHABLE', `cannot reach ${url.origin}: ${cause?.code ?? cause?.message ?? (err as Error).message}`, { cause: err });
    }
    if (!response.ok || !response.body) {
      const body = (await response.json().catch(() => undefined)) as { code?: string; message?: string } | undefined;
      const code = body?.code !== undefined && body.code in errorCodes ? (body.code as ErrorCode) : response.status === 503 ? 'VMF_UNREACHABLE' : 'VMF_INTERNAL';
      throw new VmferryError(code, body?.message ?? `GET ${url.pathname} failed with HTTP ${response.status}`);
    }
    const messages: EventSourceMessage[] = [];
    const parser = createParser({ onEvent: (message) => messages.push(message) });
    const decoder = new TextDecoder();
    quiet();
    for await (const chunk of response.body) {
      quiet();
      parser.feed(decoder.decode(chunk as Uint8Array, { stream: true }));
      yield* messages.splice(0);
    }
  } finally {
    clearTimeout(timer);
    silence.abort();
  }
}

/**
 * Migrations live, as server-sent events: one migration's progress until its
 * report (`GET /v1/migrations/:id/stream`, for `vmferry migrate` and
 * `migration watch`), and every migration at once (`GET /v1/live`, for the
 * dashboard). Each stream reads the store, the one record of what happened,
 * and sleeps until the store announces a change (events.ts); nothing here asks
 * the agents anything. Behind the same TLS and roles as the rest of the API.
 *
 * Events: `progress` `{id, seq, at, event}` (a stored MigrationEvent, SSE id =
 * seq, so a reconnecting EventSource resumes with Last-Event-ID), `report`
 * `{id, report}` (the per-migration stream's last), `migration` (a record, on
 * the all-migrations stream, whenever its phase or report changes), `drain` (a
 * host drain's status, on the all-migrations stream: each one this controller
 * runs or ran at the start, then each change).
 */
import type { ServerResponse } from 'node:http';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { Logger } from 'pino';
import { describeError, VmferryError } from '../errors.ts';
import { MigrationParamsSchema } from '../api/agent-types.ts';
import { finalPhases } from '../migration/phases.ts';
import type { MigrationRecord, Store } from '../store/store.ts';
import { drainOfChange, type MigrationChanges } from './events.ts';
import type { DrainService } from './drain.ts';

/** The store is read again this often without an announcement: writes by another controller of a shared database. */
const rereadMs = 2_000;
/** A comment line after this much silence, so proxies and idle timers keep the connection. */
const keepAliveMs = 15_000;
/** A stream ends after this long and the client reconnects where it was: no request lives unbounded. */
const maxStreamMs = 10 * 60_000;
/** A client that reads slower than this much is queued for it is dropped; it reconnects and resumes from the store. */
const maxQueuedBytes = 8 * 1024 * 1024;
/** Finished migrations the all-migrations stream starts with. */
const recentMigrations = 20;

class EventWriter {
  readonly #raw: ServerResponse;
  lastWrite = Date.now();

  constructor(raw: ServerResponse) {
    this.#raw = raw;
    // connection: close, so a stream ended by the server's close takes its socket along instead of leaving it idle for keep-alive.
    raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', 'x-accel-buffering': 'no', connection: 'close' });
    // A dropped connection is tried again after 1 s (the browser's default is 3 s).
    this.#write('retry: 1000\n\n');
  }

  get overflowing(): boolean {
    return this.#raw.writableLength > maxQueuedBytes;
  }

  send(event: string, data: unknown, id?: number): void {
    this.#write(`${id === undefined ? '' : `id: ${id}\n`}event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  }

  keepAlive(): void {
    if (Date.now() - this.lastWrite >= keepAliveMs) this.#write(': keep-alive\n\n');
  }

  end(): void {
    if (!this.#raw.writableEnded) this.#raw.end();
  }

  #write(text: string): void {
    if (this.#raw.writableEnded || this.#raw.destroyed) return;
    this.#raw.write(text);
    this.lastWrite = Date.now();
  }
}

/** Where a reconnecting client was: its Last-Event-ID header, else ?after=, else the start. */
function resumeAfter(request: FastifyRequest, after: number | undefined): number {
  const header = request.headers['last-event-id'];
  const fromHeader = typeof header === 'string' && /^\d{1,15}$/.test(header) ? Number(header) : undefined;
  const value = fromHeader ?? after ?? 0;
  if (!Number.isSafeInteger(value)) throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid request: querystring/after must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}`);
  return value;
}

export function registerEventStreams(app: FastifyInstance, store: Store, changes: MigrationChanges, drains: Pick<DrainService, 'list' | 'get'>, logger: Logger): void {
  const closing = new AbortController();
  // A stream otherwise holds its connection open, and the server's close waits for it.
  app.addHook('preClose', (done) => {
    closing.abort();
    done();
  });

  /** Runs `body` on a hijacked response until it returns, the client leaves, the server closes or maxStreamMs pass. */
  const stream = (reply: FastifyReply, what: string, body: (writer: EventWriter, signal: AbortSignal) => Promise<void>): void => {
    const left = new AbortController();
    reply.raw.on('close', () => left.abort());
    const signal = AbortSignal.any([left.signal, closing.signal, AbortSignal.timeout(maxStreamMs)]);
    reply.hijack();
    const writer = new EventWriter(reply.raw);
    body(writer, signal)
      .catch((err: unknown) => logger.warn({ err: describeError(err) }, `${what}: stream ended by an error`))
      .finally(() => writer.end());
  };

  const typed = app.withTypeProvider<TypeBoxTypeProvider>();
  typed.get(
    '/v1/migrations/:id/stream',
    {
      schema: {
        description: "Server-sent events of one migration: `progress` {id, seq, at, event} from after `after` (or Last-Event-ID), then `report` {id, report} once it has one, and the stream ends",
        params: MigrationParamsSchema,
        querystring: Type.Object({ after: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER })) }, { additionalProperties: false }),
      },
    },
    async (request, reply) => {
      const { id } = request.params;
      let after = resumeAfter(request, request.query.after);
      if (!(await store.getMigration(id))) throw new VmferryError('VMF_NOT_FOUND', `no migration ${id}`);
      stream(reply, `migration ${id}`, async (writer, signal) => {
        const subscription = changes.subscribe();
        try {
          for (;;) {
            // The record first: every event stored before its report is read after it, so none is left out.
            const record = await store.getMigration(id);
            for (const stored of await store.eventsSince(id, after)) {
              writer.send('progress', { id, ...stored }, stored.seq);
              after = stored.seq;
            }
            if (record?.report) {
              writer.send('report', { id, report: record.report });
              return;
            }
            if (signal.aborted || writer.overflowing) return;
            writer.keepAlive();
            await subscription.next(rereadMs, signal);
          }
        } finally {
          subscription.close();
        }
      });
    },
  );

  typed.get(
    '/v1/live',
    {
      schema: {
        description: `Server-sent events of every migration: \`migration\` (the record) for the ${recentMigrations} latest and each one whose phase or report changes, \`progress\` {id, seq, at, event} of every unfinished one from its start, and \`drain\` (a host drain's status) for each drain and each change of one`,
      },
    },
    async (_request, reply) => {
      stream(reply, 'all migrations', async (writer, signal) => {
        const subscription = changes.subscribe();
        /** Per migration: the last event sent, and the record as last sent. */
        const seen = new Map<string, { after: number; shown: string }>();
        const unfinished = new Set<string>();
        const look = async (record: MigrationRecord, withEvents: boolean): Promise<void> => {
          const known = seen.get(record.id) ?? { after: 0, shown: '' };
          seen.set(record.id, known);
          const shown = `${record.phase} ${record.updatedAt} ${record.report ? 'report' : ''}`;
          if (shown !== known.shown) writer.send('migration', record);
          known.shown = shown;
          if (finalPhases.includes(record.phase)) unfinished.delete(record.id);
          else unfinished.add(record.id);
          if (!withEvents) return;
          for (const stored of await store.eventsSince(record.id, known.after)) {
            writer.send('progress', { id: record.id, ...stored });
            known.after = stored.seq;
          }
        };
        try {
          // Oldest first, so a client that lists them as they come shows the newest last.
          for (const record of (await store.listMigrations(recentMigrations)).reverse()) await look(record, !finalPhases.includes(record.phase));
          for (const drain of drains.list()) writer.send('drain', drain);
          while (!signal.aborted && !writer.overflowing) {
            writer.keepAlive();
            const changed = await subscription.next(rereadMs, signal);
            // Without an announcement, the unfinished ones (another controller may run them) and any new one.
            const ids = changed.length > 0 ? changed : [...new Set([...unfinished, ...(await store.unfinishedMigrations()).map((r) => r.id)])];
            for (const id of ids) {
              const drain = drainOfChange(id);
              if (drain !== undefined) {
                writer.send('drain', drains.get(drain));
                continue;
              }
              const record = await store.getMigration(id);
              if (record) await look(record, true);
            }
          }
        } finally {
          subscription.close();
        }
      });
    },
  );
}

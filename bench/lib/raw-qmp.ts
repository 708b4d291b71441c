/**
 * A deliberately small QMP client for the "plain QMP" baseline: one unix
 * socket, JSON lines, commands matched by id, every event kept with QEMU's own
 * timestamp. It shares no code with src/qmp/ so the baseline measures QEMU's
 * migration with nothing of vmferry in the path.
 */
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export type Json = Record<string, unknown>;

export interface RawEvent {
  event: string;
  data: Json;
  /** QEMU's timestamp, microseconds since the epoch. */
  us: number;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

interface EventWaiter {
  match: (e: RawEvent) => boolean;
  resolve: (e: RawEvent) => void;
  reject: (err: Error) => void;
}

export class RawQmp {
  readonly events: RawEvent[] = [];
  readonly #socket: Socket;
  readonly #pending = new Map<number, Pending>();
  #waiters: EventWaiter[] = [];
  #nextId = 1;
  #buffered = '';
  #closed: Error | undefined;
  /** Events a wait already took: each is handed out once. */
  readonly #consumed = new Set<RawEvent>();
  #greeted = false;
  #onGreeting: ((line: string) => void) | undefined;

  private constructor(socket: Socket) {
    this.#socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.#onData(chunk));
    socket.on('close', () => this.#fail(new Error('QMP connection closed')));
    socket.on('error', (err) => this.#fail(err));
  }

  /** Connects, retrying while QEMU has not created its socket yet (bounded by timeoutMs). */
  static async connect(path: string, timeoutMs = 30_000, options: { oob?: boolean } = {}): Promise<RawQmp> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      let qmp: RawQmp | undefined;
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path, () => resolve(s));
          s.once('error', reject);
        });
        qmp = new RawQmp(socket);
        await qmp.#greeting(until - Date.now());
        await qmp.execute('qmp_capabilities', options.oob ? { enable: ['oob'] } : undefined);
        return qmp;
      } catch (err) {
        qmp?.close();
        if (Date.now() > until) throw new Error(`no QMP monitor at ${path}: ${String(err)}`);
        await sleep(50);
      }
    }
  }

  execute<T = unknown>(command: string, args?: Json): Promise<T> {
    return this.#send('execute', command, args);
  }

  /** Out of band (connected with `oob`): QEMU runs it on the monitor's thread even while its main loop is blocked. */
  executeOob<T = unknown>(command: string, args?: Json): Promise<T> {
    return this.#send('exec-oob', command, args);
  }

  #send<T>(how: 'execute' | 'exec-oob', command: string, args?: Json): Promise<T> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = this.#nextId++;
    const reply = new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (value: unknown) => void, reject });
    });
    this.#socket.write(`${JSON.stringify({ [how]: command, id, ...(args ? { arguments: args } : {}) })}\n`);
    return reply;
  }

  /** The first event (already received or future) named `name` matching `match` that no earlier wait took. */
  waitEvent(name: string, match: (data: Json) => boolean = () => true, timeoutMs = 120_000): Promise<RawEvent> {
    const test = (e: RawEvent): boolean => e.event === name && !this.#consumed.has(e) && match(e.data);
    const seen = this.events.find(test);
    if (seen) {
      this.#consumed.add(seen);
      return Promise.resolve(seen);
    }
    if (this.#closed) return Promise.reject(this.#closed);
    return new Promise<RawEvent>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error(`no QMP event ${name} within ${timeoutMs} ms`));
      }, timeoutMs);
      const waiter: EventWaiter = {
        match: test,
        resolve: (e) => {
          clearTimeout(timer);
          this.#consumed.add(e);
          resolve(e);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      this.#waiters.push(waiter);
    });
  }

  close(): void {
    this.#socket.destroy();
  }

  async #greeting(timeoutMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const line = await new Promise<string>((resolve, reject) => {
      this.#onGreeting = resolve;
      timer = setTimeout(() => reject(this.#closed ?? new Error('no QMP greeting')), Math.max(timeoutMs, 1000));
      this.#socket.once('close', () => reject(this.#closed ?? new Error('QMP connection closed')));
    }).finally(() => clearTimeout(timer));
    if (!('QMP' in (JSON.parse(line) as Json))) throw new Error(`unexpected QMP greeting: ${line}`);
  }

  #onData(chunk: string): void {
    this.#buffered += chunk;
    let newline: number;
    while ((newline = this.#buffered.indexOf('\n')) >= 0) {
      const line = this.#buffered.slice(0, newline).trim();
      this.#buffered = this.#buffered.slice(newline + 1);
      if (!line) continue;
      if (!this.#greeted) {
        this.#greeted = true;
        this.#onGreeting?.(line);
      } else {
        this.#onMessage(JSON.parse(line) as Json);
      }
    }
  }

  #onMessage(message: Json): void {
    if (typeof message.event === 'string') {
      const ts = message.timestamp as { seconds: number; microseconds: number } | undefined;
      const event: RawEvent = { event: message.event, data: (message.data as Json | undefined) ?? {}, us: ts ? ts.seconds * 1e6 + ts.microseconds : Date.now() * 1000 };
      this.events.push(event);
      const waiter = this.#waiters.find((w) => w.match(event));
      if (waiter) {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        waiter.resolve(event);
      }
      return;
    }
    const pending = typeof message.id === 'number' ? this.#pending.get(message.id) : undefined;
    if (!pending) return;
    this.#pending.delete(message.id as number);
    if ('error' in message) {
      const error = message.error as { class?: string; desc?: string };
      pending.reject(new Error(`QMP error: ${error.desc ?? ''} (${error.class ?? ''})`));
    } else {
      pending.resolve(message.return);
    }
  }

  #fail(err: Error): void {
    if (this.#closed) return;
    this.#closed = err;
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
    for (const w of this.#waiters) w.reject(err);
    this.#waiters = [];
  }
}

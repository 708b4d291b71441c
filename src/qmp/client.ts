/**
 * A QMP client: connects to a QEMU monitor socket, reads the greeting,
 * negotiates capabilities, runs commands concurrently (replies matched by id)
 * and delivers events to listeners. Listeners are opened *before* the command
 * that triggers their event, so no event can slip past between the two.
 *
 * When QEMU offers it, out-of-band execution is switched on: a command sent
 * with `{ oob: true }` runs at once on the monitor's own thread, even while
 * QEMU's main loop is stuck (a migration blocked on a dead socket), and its
 * reply may overtake replies to earlier commands.
 */
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import { Deadline, abortError, raceAbort } from '../util/abort.ts';
import { QmpEventListener, type QmpEvent, type WaitOptions } from './events.ts';
import { MessageStream, type JsonObject } from './message-stream.ts';

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** QEMU answered a command with an error; `errorClass` is QMP's class (GenericError, DeviceNotFound, …). */
export class QmpCommandError extends VmferryError {
  readonly errorClass: string;
  readonly command: string;
  /** QEMU's own words, for the few callers that must tell one refusal from another. */
  readonly description: string;

  constructor(command: string, errorClass: string, description: string) {
    super('VMF_QMP_COMMAND', `QMP ${command} failed: ${description} (${errorClass})`);
    this.name = 'QmpCommandError';
    this.command = command;
    this.errorClass = errorClass;
    this.description = description;
  }
}

export interface ConnectOptions {
  /** How long to keep retrying while QEMU has not created its socket yet, and to wait for the greeting. */
  timeoutMs?: number;
  signal?: AbortSignal;
  logger?: Logger;
  /** Default time limit for each command; individual calls may override it. */
  commandTimeoutMs?: number;
}

/** A command's time limit and signal, as a wait's. */
export type ExecuteOptions = WaitOptions;

export interface CommandOptions extends ExecuteOptions {
  /**
   * Send as `exec-oob`: QEMU runs it on the monitor thread without waiting
   * for its main loop. Only for commands QEMU marks allow-oob (yank,
   * query-yank, migrate-pause, migrate-recover, …) and only when the monitor
   * offered OOB (`oobEnabled`).
   */
  oob?: boolean;
}

interface PendingCommand {
  command: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
}

/** An in-band command held back until QEMU has room in its queue; see maxInBandAtQemu. */
interface HeldCommand {
  id: number;
  command: string;
  message: JsonObject;
}

const defaultConnectTimeoutMs = 10_000;
const defaultCommandTimeoutMs = 30_000;
const connectRetryDelayMs = 50;
/**
 * With OOB on, QEMU queues in-band commands while its main loop is busy, but
 * stops reading the socket once 8 wait (QMP_REQ_QUEUE_LEN_MAX in
 * monitor/monitor-internal.h), and then would not see an OOB command either.
 * Keeping at most 7 unanswered (counting those a caller gave up on: QEMU
 * still holds them) means an OOB command is always read.
 */
const maxInBandAtQemu = 7;

function isRetryableConnectError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ECONNREFUSED';
}

function openSocket(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    const onError = (err: Error): void => {
      socket.destroy();
      reject(err);
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      resolve(socket);
    });
  });
}

async function connectWithRetry(path: string, signal: AbortSignal): Promise<Socket> {
  for (;;) {
    try {
      return await raceAbort(openSocket(path), signal, `connecting to QMP socket ${path}`);
    } catch (err) {
      if (signal.aborted || !isRetryableConnectError(err)) {
        throw new VmferryError('VMF_QMP_CONNECT', `cannot connect to QMP socket ${path}: ${describeError(err)}`, { cause: err });
      }
    }
    await sleep(connectRetryDelayMs, undefined, { signal }).catch(() => undefined);
  }
}

export class QmpClient {
  readonly greeting: QmpGreeting;
  readonly #stream: MessageStream;
  readonly #pending = new Map<number, PendingCommand>();
  readonly #listeners = new Set<QmpEventListener>();
  readonly #logger: Logger | undefined;
  readonly #commandTimeoutMs: number;
  /** In-band commands QEMU has and has not answered yet: id to command. */
  readonly #inBandAtQemu = new Map<number, string>();
  readonly #heldInBand: HeldCommand[] = [];
  /** Callers of answered(), each waiting for the in-band commands up to its id. */
  readonly #answerWaits: { upTo: number; resolve: () => void }[] = [];
  #oobEnabled = false;
  #nextId = 1;
  #closeError: Error | undefined;
  #closedResolve!: (error: Error | undefined) => void;
  /** Settles when the connection ends, with the reason if it was not closed by us. */
  readonly closed: Promise<Error | undefined>;

  private constructor(stream: MessageStream, greeting: QmpGreeting, options: ConnectOptions) {
    this.#stream = stream;
    this.greeting = greeting;
    this.#logger = options.logger;
    this.#commandTimeoutMs = options.commandTimeoutMs ?? defaultCommandTimeoutMs;
    this.closed = new Promise((resolve) => (this.#closedResolve = resolve));
  }

  /** Connects (retrying while the socket does not exist yet), reads the greeting, negotiates capabilities. */
  static async connect(path: string, options: ConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? defaultConnectTimeoutMs;
    using deadline = new Deadline(`connecting to QMP socket ${path}`, timeoutMs, options.signal);
    const socket = await connectWithRetry(path, deadline.signal);
    const client = await QmpClient.#handshake(socket, path, deadline.signal, options);
    const offersOob = client.greeting.capabilities.includes('oob');
    await client.execute('qmp_capabilities', offersOob ? { enable: ['oob'] } : undefined, { signal: deadline.signal });
    client.#oobEnabled = offersOob;
    return client;
  }

  static #handshake(socket: Socket, path: string, signal: AbortSignal, options: ConnectOptions): Promise<QmpClient> {
    return new Promise((resolve, reject) => {
      let client: QmpClient | undefined;
      let settled = false;
      // The first failure is the one reported; the close it causes is not news.
      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        signal.removeEventListener('abort', onAbort);
        reject(err);
        stream.destroy();
      };
      const onAbort = (): void => fail(abortError(signal, `waiting for the QMP greeting on ${path}`));
      const stream = new MessageStream(socket, {
        onMessage: (message) => {
          if (client) {
            client.#dispatch(message);
            return;
          }
          // QEMU 7.2 may write an event to a connection it just accepted before its greeting (a monitor leaves the
          // capabilities negotiation only when its connection's OPENED event is handled, and sends events to any other:
          // seen as a RESUME of a guest started without -S). Nothing has been asked yet, so it is nobody's.
          if (typeof message.event === 'string') return;
          const greeting = message.QMP as QmpGreeting | undefined;
          if (typeof greeting !== 'object' || greeting === null || !Array.isArray(greeting.capabilities)) {
            fail(new VmferryError('VMF_QMP_PROTOCOL', `expected a QMP greeting on ${path}, got ${JSON.stringify(message).slice(0, 200)}`));
            return;
          }
          settled = true;
          signal.removeEventListener('abort', onAbort);
          client = new QmpClient(stream, greeting, options);
          resolve(client);
        },
        onClose: (error) => {
          if (client) client.#onClose(error);
          else fail(error ?? new VmferryError('VMF_QMP_CONNECT', `QMP socket ${path} closed before the greeting`));
        },
      });
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  get isClosed(): boolean {
    return this.#stream.closed;
  }

  /** True when QEMU offered out-of-band execution and it was switched on: `execute(…, { oob: true })` works. */
  get oobEnabled(): boolean {
    return this.#oobEnabled;
  }

  /** Runs a command and resolves with its `return` value; QMP errors reject with QmpCommandError. */
  execute<T = unknown>(command: string, args?: JsonObject, options: CommandOptions = {}): Promise<T> {
    if (this.#stream.closed) {
      return Promise.reject(
        new VmferryError('VMF_QMP_CLOSED', `QMP ${command} not sent: the connection is closed`, { cause: this.#closeError }),
      );
    }
    if (options.oob && !this.#oobEnabled) {
      return Promise.reject(
        new VmferryError('VMF_QMP_PROTOCOL', `QMP ${command} cannot be sent out of band: this monitor did not offer the oob capability`),
      );
    }
    const id = this.#nextId++;
    const deadline = new Deadline(`QMP ${command}`, options.timeoutMs ?? this.#commandTimeoutMs, options.signal);
    const reply = new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { command, resolve: resolve, reject: reject });
    });
    const message: JsonObject = { [options.oob ? 'exec-oob' : 'execute']: command, id };
    if (args !== undefined) message.arguments = args;
    if (options.oob) this.#send(message);
    else this.#sendInBand({ id, command, message });
    return raceAbort(reply, deadline.signal, `QMP ${command}`).finally(() => {
      // A late reply after a timeout finds no entry and is dropped; a command still held back is never sent.
      this.#pending.delete(id);
      const held = this.#heldInBand.findIndex((h) => h.id === id);
      if (held >= 0) {
        this.#heldInBand.splice(held, 1);
        this.#settleAnswerWaits();
      }
      deadline.dispose();
    });
  }

  /**
   * In-band commands QEMU was sent and has not answered, oldest first, by
   * name: a command whose caller gave up (a timeout, an abort) stays until
   * QEMU answers it, as QEMU is still running it.
   */
  get unanswered(): string[] {
    return [...this.#inBandAtQemu.values()];
  }

  /**
   * Resolves once QEMU has answered every in-band command requested before
   * the call (those given up on included, those never sent aside), or the
   * connection ended: from then on QEMU's main loop runs none of them, so an
   * out-of-band command no longer lands beside one.
   */
  answered(): Promise<void> {
    return new Promise((resolve) => {
      this.#answerWaits.push({ upTo: this.#nextId - 1, resolve });
      this.#settleAnswerWaits();
    });
  }

  #settleAnswerWaits(): void {
    const outstanding = [...this.#inBandAtQemu.keys(), ...this.#heldInBand.map((h) => h.id)];
    for (const wait of [...this.#answerWaits]) {
      if (outstanding.some((id) => id <= wait.upTo)) continue;
      this.#answerWaits.splice(this.#answerWaits.indexOf(wait), 1);
      wait.resolve();
    }
  }

  /**
   * Starts buffering events from now on. Open it before the command that
   * causes the event you wait for, and close it when done.
   */
  listen(): QmpEventListener {
    const listener = new QmpEventListener((l) => this.#listeners.delete(l));
    if (this.#stream.closed) listener.end(this.#closedError('listening for events'));
    else this.#listeners.add(listener);
    return listener;
  }

  /** Waits for one event from now on; shorthand for a listener used once. */
  async waitFor(event: string, predicate?: (e: QmpEvent) => boolean, options: ExecuteOptions = {}): Promise<QmpEvent> {
    using listener = this.listen();
    return await listener.waitFor(event, predicate, options);
  }

  /** Closes the connection; pending commands and waits reject with VMF_QMP_CLOSED. */
  close(): void {
    this.#stream.destroy();
  }

  #send(message: JsonObject): void {
    this.#logger?.debug({ qmp: message }, 'qmp send');
    this.#stream.send(message);
  }

  #sendInBand(command: HeldCommand): void {
    if (this.#inBandAtQemu.size >= maxInBandAtQemu) {
      this.#heldInBand.push(command);
      return;
    }
    this.#inBandAtQemu.set(command.id, command.command);
    this.#send(command.message);
  }

  #dispatch(message: JsonObject): void {
    this.#logger?.debug({ qmp: message }, 'qmp receive');
    if (typeof message.event === 'string') {
      const ts = message.timestamp as { seconds?: number; microseconds?: number } | undefined;
      const event: QmpEvent = {
        event: message.event,
        data: (message.data as JsonObject | undefined) ?? {},
        timestampUs: (ts?.seconds ?? 0) * 1_000_000 + (ts?.microseconds ?? 0),
      };
      for (const listener of this.#listeners) listener.push(event);
      return;
    }
    const id = message.id;
    if (typeof id === 'number' && this.#inBandAtQemu.delete(id)) {
      const next = this.#heldInBand.shift();
      if (next) this.#sendInBand(next);
      this.#settleAnswerWaits();
    }
    const pending = typeof id === 'number' ? this.#pending.get(id) : undefined;
    if (!pending) {
      // A reply to a command that already timed out, or a peer that is not QEMU.
      this.#logger?.warn({ qmp: message }, 'QMP reply with an unknown id ignored');
      return;
    }
    this.#pending.delete(id as number);
    if ('return' in message) {
      pending.resolve(message.return);
    } else if (typeof message.error === 'object' && message.error !== null) {
      const error = message.error as { class?: unknown; desc?: unknown };
      const errorClass = typeof error.class === 'string' ? error.class : 'GenericError';
      const description = typeof error.desc === 'string' ? error.desc : 'no description';
      pending.reject(new QmpCommandError(pending.command, errorClass, description));
    } else {
      pending.reject(new VmferryError('VMF_QMP_PROTOCOL', `QMP reply to ${pending.command} has neither return nor error`));
    }
  }

  #closedError(what: string): VmferryError {
    const why = this.#closeError ? `: ${describeError(this.#closeError)}` : '';
    return new VmferryError('VMF_QMP_CLOSED', `QMP connection closed while ${what}${why}`, { cause: this.#closeError });
  }

  #onClose(error: Error | undefined): void {
    this.#closeError = error;
    for (const pending of this.#pending.values()) pending.reject(this.#closedError(`waiting for the reply to ${pending.command}`));
    this.#pending.clear();
    this.#heldInBand.length = 0;
    this.#inBandAtQemu.clear();
    this.#settleAnswerWaits();
    for (const listener of this.#listeners) listener.end(this.#closedError('waiting for an event'));
    this.#listeners.clear();
    this.#closedResolve(error);
  }
}

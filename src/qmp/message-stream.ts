/**
 * A socket that carries one JSON object per line, as QMP does. It knows nothing
 * of QMP itself: it frames, parses and writes messages, and reports the end of
 * the stream once, with the reason.
 */
import type { Socket } from 'node:net';
import { VmferryError } from '../errors.ts';

/** QEMU's largest replies (query-block on many disks) are far below this. */
const maxMessageBytes = 16 * 1024 * 1024;

export type JsonObject = Record<string, unknown>;

export interface MessageStreamHandlers {
  onMessage(message: JsonObject): void;
  /** Called once when the stream ends; `error` says why when it was not a clean close. */
  onClose(error: Error | undefined): void;
}

export class MessageStream {
  readonly #socket: Socket;
  readonly #handlers: MessageStreamHandlers;
  #pending = '';
  #closed = false;

  constructor(socket: Socket, handlers: MessageStreamHandlers) {
    this.#socket = socket;
    this.#handlers = handlers;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.#receive(chunk));
    socket.on('error', (err) => this.#finish(err));
    socket.on('close', () => this.#finish(undefined));
  }

  get closed(): boolean {
    return this.#closed;
  }

  send(message: JsonObject): void {
    if (this.#closed) throw new VmferryError('VMF_QMP_CLOSED', 'QMP connection is closed');
    this.#socket.write(`${JSON.stringify(message)}\n`);
  }

  /** Closes the stream; a protocol error passed here is what onClose reports. */
  destroy(error?: Error): void {
    this.#finish(error);
    this.#socket.destroy();
  }

  #receive(chunk: string): void {
    // Only the new chunk is searched for line ends, so a long message costs linear time.
    let start = 0;
    let newline: number;
    while (!this.#closed && (newline = chunk.indexOf('\n', start)) >= 0) {
      const line = (this.#pending + chunk.slice(start, newline)).trim();
      this.#pending = '';
      start = newline + 1;
      if (line.length > 0) this.#parse(line);
    }
    if (this.#closed) return;
    this.#pending += chunk.slice(start);
    if (this.#pending.length > maxMessageBytes) {
      this.destroy(new VmferryError('VMF_QMP_PROTOCOL', `QMP peer sent a line longer than ${maxMessageBytes} bytes`));
    }
  }

  #parse(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch (err) {
      this.destroy(new VmferryError('VMF_QMP_PROTOCOL', `QMP peer sent invalid JSON: ${line.slice(0, 200)}`, { cause: err }));
      return;
    }
    if (typeof message !== 'object' || message === null || Array.isArray(message)) {
      this.destroy(new VmferryError('VMF_QMP_PROTOCOL', `QMP peer sent a non-object message: ${line.slice(0, 200)}`));
      return;
    }
    this.#handlers.onMessage(message as JsonObject);
  }

  #finish(error: Error | undefined): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#handlers.onClose(error);
  }
}

/**
 * Reads exact byte counts from a socket as promises, with backpressure: the
 * socket is paused while more than `highWaterBytes` sit unread, so a client
 * that floods us cannot grow our memory.
 */
import type { Socket } from 'node:net';

export class ConnectionClosedError extends Error {
  constructor(message = 'connection closed') {
    super(message);
    this.name = 'ConnectionClosedError';
  }
}

export class SocketReader {
  readonly #socket: Socket;
  readonly #highWaterBytes: number;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #waiter: { bytes: number; resolve: (buf: Buffer) => void; reject: (err: Error) => void } | undefined;
  #ended: Error | undefined;

  constructor(socket: Socket, highWaterBytes: number) {
    this.#socket = socket;
    this.#highWaterBytes = highWaterBytes;
    socket.on('data', (chunk: Buffer) => this.#push(chunk));
    socket.on('end', () => this.#end(new ConnectionClosedError()));
    socket.on('close', () => this.#end(new ConnectionClosedError()));
    socket.on('error', (err) => this.#end(new ConnectionClosedError(`connection error: ${err.message}`)));
  }

  get buffered(): number {
    return this.#buffered;
  }

  /** Resolves with exactly `bytes` bytes, or rejects with ConnectionClosedError if the stream ends first. */
  read(bytes: number): Promise<Buffer> {
    if (this.#buffered >= bytes) return Promise.resolve(this.#take(bytes));
    if (this.#ended) return Promise.reject(this.#ended);
    return new Promise((resolve, reject) => {
      this.#waiter = { bytes, resolve, reject };
      this.#socket.resume();
    });
  }

  /** Reads and drops `bytes` bytes without holding them all in memory. */
  async skip(bytes: number): Promise<void> {
    let left = bytes;
    while (left > 0) {
      const step = Math.min(left, this.#highWaterBytes);
      await this.read(step);
      left -= step;
    }
  }

  #push(chunk: Buffer): void {
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    const waiter = this.#waiter;
    if (waiter && this.#buffered >= waiter.bytes) {
      this.#waiter = undefined;
      waiter.resolve(this.#take(waiter.bytes));
    }
    if (this.#buffered > this.#highWaterBytes && !this.#waiter) this.#socket.pause();
  }

  #take(bytes: number): Buffer {
    this.#buffered -= bytes;
    const first = this.#chunks[0] as Buffer;
    if (first.length === bytes) {
      this.#chunks.shift();
      return first;
    }
    if (first.length > bytes) {
      this.#chunks[0] = first.subarray(bytes);
      return first.subarray(0, bytes);
    }
    const out = Buffer.allocUnsafe(bytes);
    let filled = 0;
    while (filled < bytes) {
      const chunk = this.#chunks[0] as Buffer;
      const used = Math.min(chunk.length, bytes - filled);
      chunk.copy(out, filled, 0, used);
      filled += used;
      if (used === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(used);
    }
    return out;
  }

  #end(error: Error): void {
    this.#ended ??= error;
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.reject(this.#ended);
  }
}

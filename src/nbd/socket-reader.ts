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

/**
 * A connection's incoming bytes, read in exact counts. What read() and
 * tryRead() return is the caller's; chunks from readChunks() and
 * tryReadChunks() may be lent from the server's BufferPool, so whoever is
 * done with them gives them to BufferPool.give (which ignores anything it did
 * not lend).
 */
export interface ByteReader {
  readonly buffered: number;
  read(bytes: number): Promise<Buffer>;
  tryRead(bytes: number): Buffer | undefined;
  readChunks(bytes: number): Promise<Buffer[]>;
  tryReadChunks(bytes: number): Buffer[] | undefined;
  skip(bytes: number): Promise<void>;
  cancel(error: Error): void;
  detach(): void;
}

/** Reads a socket's 'data' chunks: each is a fresh buffer of Node's, handed on without a copy. */
export class SocketReader implements ByteReader {
  readonly #socket: Socket;
  readonly #highWaterBytes: number;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #waiter: { bytes: number; resolve: (chunks: Buffer[]) => void; reject: (err: Error) => void } | undefined;
  #ended: Error | undefined;

  readonly #listeners: { data: (chunk: Buffer) => void; end: () => void; error: (err: Error) => void };

  constructor(socket: Socket, highWaterBytes: number) {
    this.#socket = socket;
    this.#highWaterBytes = highWaterBytes;
    this.#listeners = {
      data: (chunk) => this.#push(chunk),
      end: () => this.#end(new ConnectionClosedError()),
      error: (err) => this.#end(new ConnectionClosedError(`connection error: ${err.message}`)),
    };
    socket.on('data', this.#listeners.data);
    socket.on('end', this.#listeners.end);
    socket.on('close', this.#listeners.end);
    socket.on('error', this.#listeners.error);
  }

  get buffered(): number {
    return this.#buffered;
  }

  /** Resolves with exactly `bytes` bytes, or rejects with ConnectionClosedError if the stream ends first. */
  async read(bytes: number): Promise<Buffer> {
    const chunks = await this.readChunks(bytes);
    return chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, bytes);
  }

  /**
   * Exactly `bytes` bytes if they are already here, else undefined (then read()):
   * a burst of pipelined requests is taken off the buffer without a promise each.
   */
  tryRead(bytes: number): Buffer | undefined {
    if (this.#buffered < bytes) return undefined;
    const chunks = this.#take(bytes);
    return chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, bytes);
  }

  /** Like tryRead, as the chunks they arrived in. */
  tryReadChunks(bytes: number): Buffer[] | undefined {
    return this.#buffered < bytes ? undefined : this.#take(bytes);
  }

  /** Like read, but as the chunks they arrived in: a large payload is never copied into one buffer. */
  readChunks(bytes: number): Promise<Buffer[]> {
    if (this.#buffered >= bytes) return Promise.resolve(this.#take(bytes));
    if (this.#ended) return Promise.reject(this.#ended);
    return new Promise((resolve, reject) => {
      this.#waiter = { bytes, resolve, reject };
      this.#socket.resume();
    });
  }

  /** Ends the reader: a read waiting now, and every later one, rejects with `error` (the socket stays open). */
  cancel(error: Error): void {
    this.#end(error);
  }

  /**
   * Stops reading the socket and lets go of it (paused, so what arrives next
   * waits in the socket for whoever reads it after us: a TLS layer taking it
   * over). Later reads reject. Only when nothing is buffered: bytes already
   * taken off the socket cannot be handed back.
   */
  detach(): void {
    if (this.#buffered > 0) throw new Error(`cannot detach a socket reader holding ${this.#buffered} unread bytes`);
    this.#socket.pause();
    this.#socket.off('data', this.#listeners.data);
    this.#socket.off('end', this.#listeners.end);
    this.#socket.off('close', this.#listeners.end);
    this.#socket.off('error', this.#listeners.error);
    this.#end(new ConnectionClosedError('the socket was handed over'));
  }

  /** Reads and drops `bytes` bytes without holding them all in memory. */
  async skip(bytes: number): Promise<void> {
    let left = bytes;
    while (left > 0) {
      const step = Math.min(left, this.#highWaterBytes);
      await this.readChunks(step);
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

  #take(bytes: number): Buffer[] {
    this.#buffered -= bytes;
    const out: Buffer[] = [];
    let left = bytes;
    while (left > 0) {
      const chunk = this.#chunks[0] as Buffer;
      if (chunk.length <= left) {
        out.push(chunk);
        this.#chunks.shift();
        left -= chunk.length;
      } else {
        out.push(chunk.subarray(0, left));
        this.#chunks[0] = chunk.subarray(left);
        left = 0;
      }
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

/**
 * Reads a server's accepted socket into one buffer used again for every read
 * (Node's `onread` option), instead of the fresh buffer Node allocates per
 * read. Those fresh buffers are memory V8 counts outside its heap, and with
 * 1 MiB writes arriving at disk speed their churn kept V8's full collector
 * running (docs/BENCHMARKS.md, issue 20).
 *
 * A read waiting for 64 KiB or more (a write's payload, in a buffer from the
 * server's BufferPool) has the socket read straight into it. Otherwise the
 * socket reads into the reused buffer, which the next read overwrites, so
 * every byte is copied out before the read's callback returns: into the
 * waiting read's buffer, the rest into a staging buffer of fixed size. Same
 * backpressure as SocketReader: reading stops while more than
 * `highWaterBytes` wait unread.
 */
import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import type { BufferPool } from './buffer-pool.ts';
import { ConnectionClosedError, type ByteReader } from './socket-reader.ts';

/** Bytes one socket read into the reused buffer may bring (Node's own read size); a waiting read at least this large is read into directly. */
const readBufferBytes = 64 * 1024;

interface Fill {
  target: Buffer;
  filled: number;
  done: (target: Buffer) => void;
  fail: (err: Error) => void;
}

export class ReusedBufferReader implements ByteReader {
  readonly #highWaterBytes: number;
  readonly #pool: BufferPool;
  /** What the socket reads into unless #direct is set. */
  readonly #readBuffer = Buffer.allocUnsafeSlow(readBufferBytes);
  /** Bytes read and not yet taken: #staging[#start, #end). Reading stops at the high-water mark, so one read past it always fits. */
  #staging: Buffer;
  #start = 0;
  #end = 0;
  /** A read waiting for more bytes than are staged; while it waits, nothing is staged (all of it went into its target). */
  #waiter: Fill | undefined;
  /** The read whose target the socket reads into next (the reused buffer when unset). */
  #direct: Fill | undefined;
  #ended: Error | undefined;
  #socket: Socket | undefined;

  constructor(highWaterBytes: number, pool: BufferPool) {
    this.#highWaterBytes = highWaterBytes;
    this.#pool = pool;
    this.#staging = Buffer.allocUnsafeSlow(highWaterBytes + readBufferBytes);
  }

  /**
   * Takes over `accepted`, a socket a net.Server accepted with `pauseOnConnect`
   * (nothing read yet), and returns the socket to use instead, read through
   * this reader; undefined if this Node has no way to do that (then use
   * `accepted` as it is). Node offers `onread` only to sockets it creates for
   * the caller, and a server creates its own: so the accepted socket's handle
   * (a private field, `_handle`) moves to a socket of ours.
   */
  adopt(accepted: Socket): Socket | undefined {
    const holder = accepted as unknown as { _handle: unknown };
    const handle = holder._handle;
    if (typeof handle !== 'object' || handle === null) return undefined;
    // Let go of the handle without closing it; destroying the husk also ends the listener's count of it.
    holder._handle = null;
    accepted.destroy();
    // `handle` and `noDelay` are options Node's own server passes; Node's types do not list them.
    const options: SocketConstructorOpts & { handle: object; noDelay: boolean; onread: OnReadOpts } = {
      handle,
      readable: true,
      writable: true,
      noDelay: true,
      onread: { buffer: () => this.#nextReadBuffer(), callback: (bytes) => this.#onRead(bytes) },
    };
    const socket = new Socket(options);
    this.#socket = socket;
    const end = (): void => this.#finish(new ConnectionClosedError());
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', (err) => this.#finish(new ConnectionClosedError(`connection error: ${err.message}`)));
    return socket;
  }

  get buffered(): number {
    return this.#end - this.#start;
  }

  read(bytes: number): Promise<Buffer> {
    return this.#fill(Buffer.allocUnsafe(bytes));
  }

  tryRead(bytes: number): Buffer | undefined {
    return this.buffered < bytes ? undefined : this.#take(Buffer.allocUnsafe(bytes));
  }

  /** One chunk, lent from the pool: give it back once done with it. */
  async readChunks(bytes: number): Promise<Buffer[]> {
    return [await this.#fill(this.#pool.take(bytes))];
  }

  tryReadChunks(bytes: number): Buffer[] | undefined {
    return this.buffered < bytes ? undefined : [this.#take(this.#pool.take(bytes))];
  }

  async skip(bytes: number): Promise<void> {
    for (let left = bytes; left > 0; ) {
      const step = Math.min(left, this.#highWaterBytes);
      await this.read(step);
      left -= step;
    }
  }

  cancel(error: Error): void {
    this.#finish(error);
  }

  /** Handing the socket to a TLS layer is not supported: a server with TLS reads its sockets with SocketReader. */
  detach(): void {
    throw new Error('a socket read into a reused buffer cannot be handed over');
  }

  /** Fills `target` from the staged bytes, then from the socket. */
  #fill(target: Buffer): Promise<Buffer> {
    if (this.buffered >= target.length) return Promise.resolve(this.#take(target));
    if (this.#ended) {
      this.#pool.give(target);
      return Promise.reject(this.#ended);
    }
    const filled = this.buffered;
    this.#staging.copy(target, 0, this.#start, this.#end);
    this.#start = this.#end = 0;
    return new Promise((resolve, reject) => {
      this.#waiter = { target, filled, done: resolve, fail: reject };
      this.#socket?.resume();
    });
  }

  #take(target: Buffer): Buffer {
    this.#staging.copy(target, 0, this.#start, this.#start + target.length);
    this.#start += target.length;
    if (this.#start === this.#end) this.#start = this.#end = 0;
    return target;
  }

  /** Node asks for the memory of the socket's next read after every read. */
  #nextReadBuffer(): Buffer {
    const waiter = this.#waiter;
    if (waiter && waiter.target.length - waiter.filled >= readBufferBytes) {
      this.#direct = waiter;
      return waiter.target.subarray(waiter.filled);
    }
    this.#direct = undefined;
    return this.#readBuffer;
  }

  /** Node's onread callback: `bytes` new bytes in the memory #nextReadBuffer gave. Returns false to stop reading. */
  #onRead(bytes: number): boolean {
    const direct = this.#direct;
    if (direct) {
      // A read of at most what the target lacks; if the reader ended meanwhile, the bytes go with it.
      if (direct === this.#waiter) {
        direct.filled += bytes;
        if (direct.filled === direct.target.length) {
          this.#waiter = undefined;
          direct.done(direct.target);
        }
      }
      return this.#waiter !== undefined || this.buffered < this.#highWaterBytes;
    }
    let from = 0;
    const waiter = this.#waiter;
    if (waiter) {
      from = Math.min(bytes, waiter.target.length - waiter.filled);
      this.#readBuffer.copy(waiter.target, waiter.filled, 0, from);
      waiter.filled += from;
      if (waiter.filled === waiter.target.length) {
        this.#waiter = undefined;
        waiter.done(waiter.target);
      }
    }
    if (from < bytes) this.#stage(from, bytes);
    return this.#waiter !== undefined || this.buffered < this.#highWaterBytes;
  }

  #stage(from: number, to: number): void {
    const length = to - from;
    if (this.#end + length > this.#staging.length) {
      const staged = this.buffered;
      // Never hit while reading stops at the high-water mark; if it is, growing beats losing bytes.
      const staging = staged + length > this.#staging.length ? Buffer.allocUnsafeSlow(2 * (staged + length)) : this.#staging;
      this.#staging.copy(staging, 0, this.#start, this.#end);
      this.#staging = staging;
      this.#start = 0;
      this.#end = staged;
    }
    this.#readBuffer.copy(this.#staging, this.#end, from, to);
    this.#end += length;
  }

  #finish(error: Error): void {
    this.#ended ??= error;
    const waiter = this.#waiter;
    this.#waiter = undefined;
    if (!waiter) return;
    // A target the socket may still read into is not given back: another request would get those bytes.
    if (waiter !== this.#direct) this.#pool.give(waiter.target);
    waiter.fail(this.#ended);
  }
}

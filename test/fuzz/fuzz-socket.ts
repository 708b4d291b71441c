/**
 * A byte-level TCP peer for fuzzing: writes whatever it is given, reads exact
 * byte counts with a deadline, and tells a clean close by the server from one
 * it caused itself. Unlike test/support/raw-nbd.ts it never waits without a
 * deadline, so a fuzz case that makes the server go silent is reported, not hung.
 */
import { connect, type Socket } from 'node:net';

export class FuzzSocket {
  readonly socket: Socket;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #wake: (() => void) | undefined;
  /** The server ended or reset the connection (not counting our own destroy()). */
  closedByPeer = false;
  closed = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.#chunks.push(chunk);
      this.#buffered += chunk.length;
      this.#notify();
    });
    const onPeerGone = (): void => {
      if (!this.closed) this.closedByPeer = true;
      this.closed = true;
      this.#notify();
    };
    socket.on('end', onPeerGone);
    socket.on('close', onPeerGone);
    socket.on('error', () => undefined);
  }

  static open(port: number, timeoutMs = 10_000): Promise<FuzzSocket> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port, noDelay: true });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connecting to 127.0.0.1:${port} took over ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new FuzzSocket(socket));
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
  }

  get buffered(): number {
    return this.#buffered;
  }

  /** Exactly n bytes, or undefined when the connection closed or the deadline passed first. */
  async read(n: number, deadline: number): Promise<Buffer | undefined> {
    while (this.#buffered < n) {
      if (this.closed || Date.now() >= deadline) return undefined;
      await this.#wait(deadline);
    }
    const all = this.#chunks.length === 1 ? (this.#chunks[0] as Buffer) : Buffer.concat(this.#chunks, this.#buffered);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.#chunks = rest.length ? [rest] : [];
    this.#buffered = rest.length;
    return out;
  }

  /** Drops whatever arrived so far. */
  discard(): void {
    this.#chunks = [];
    this.#buffered = 0;
  }

  /** Resolves true when the server closes the connection before the deadline. */
  async waitClosed(deadline: number): Promise<boolean> {
    while (!this.closed && Date.now() < deadline) {
      this.discard();
      await this.#wait(deadline);
    }
    return this.closedByPeer;
  }

  /** Resolves once nothing new arrived for quietMs (or the connection closed, or the deadline passed). */
  async quiet(quietMs: number, deadline: number): Promise<void> {
    for (;;) {
      const before = this.#buffered;
      await this.#wait(Math.min(deadline, Date.now() + quietMs));
      if (this.closed || this.#buffered === before || Date.now() >= deadline) return;
    }
  }

  /** Writes in the pieces given (the server must reassemble however the bytes are split). */
  write(...pieces: Buffer[]): void {
    if (this.socket.destroyed) return;
    for (const piece of pieces) this.socket.write(piece);
  }

  /**
   * Closes our end; `reset` sends an RST instead of a FIN, but only while the
   * peer has not closed and no write is pending: on Node 20 resetting such a
   * socket leaves a handle that never closes, and the process spins forever at
   * exit in Environment::CleanupHandles.
   */
  destroy(reset = false): void {
    const canReset = !this.closed && !this.socket.destroyed && this.socket.writableLength === 0;
    this.closed = true;
    if (reset && canReset) this.socket.resetAndDestroy();
    else this.socket.destroy();
    this.#notify();
  }

  #wait(deadline: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#wake = undefined;
        resolve();
      }, Math.max(1, Math.min(deadline - Date.now(), 250)));
      this.#wake = () => {
        clearTimeout(timer);
        this.#wake = undefined;
        resolve();
      };
    });
  }

  #notify(): void {
    this.#wake?.();
  }
}

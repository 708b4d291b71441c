/**
 * The client side of the test guest's numbered TCP stream (vmferry-guest.c):
 * one connection from a network namespace (busybox nc relays the bytes), and
 * a check that every 8-byte big-endian number arrives once and in order. A
 * connection that closes, or a number out of place, breaks the stream.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';

export interface StreamWindow {
  /** Numbers received in the window. */
  numbers: number;
  /** The longest time without a byte in the window, in ms. */
  longestStallMs: number;
  /** The connection is open and every number so far came once and in order. */
  intact: boolean;
}

export class StreamCheck {
  readonly #child: ChildProcess;
  #pending = Buffer.alloc(0);
  #expected = 0n;
  #problem: string | undefined;
  #closed = false;
  #lastDataAt = 0;
  #windowStart = { numbers: 0n, longestStallMs: 0 };

  private constructor(child: ChildProcess) {
    this.#child = child;
    child.stdout?.on('data', (chunk: Buffer) => this.#onData(chunk));
    child.once('close', () => {
      this.#closed = true;
    });
  }

  /** Connects from `namespace` to the guest's stream and waits for its first number (retrying while the guest starts). */
  static async connect(namespace: string, address: string, port: number, timeoutMs = 60_000): Promise<StreamCheck> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const child = spawn('ip', ['netns', 'exec', namespace, 'busybox', 'nc', address, String(port)], { stdio: ['pipe', 'pipe', 'ignore'] });
      const check = new StreamCheck(child);
      while (!check.#closed && check.#expected === 0n && Date.now() < deadline) await sleep(50);
      if (check.#expected > 0n) return check;
      await check.close();
      if (Date.now() >= deadline) throw new VmferryError('VMF_TIMEOUT', `the guest's stream at ${address}:${port} sent nothing within ${timeoutMs} ms`);
      await sleep(500);
    }
  }

  #onData(chunk: Buffer): void {
    const now = Date.now();
    if (this.#lastDataAt > 0) this.#windowStart.longestStallMs = Math.max(this.#windowStart.longestStallMs, now - this.#lastDataAt);
    this.#lastDataAt = now;
    this.#pending = Buffer.concat([this.#pending, chunk]);
    let offset = 0;
    for (; offset + 8 <= this.#pending.length; offset += 8) {
      const value = this.#pending.readBigUInt64BE(offset);
      if (value !== this.#expected && this.#problem === undefined) this.#problem = `expected number ${this.#expected}, got ${value}`;
      this.#expected = value + 1n;
    }
    this.#pending = this.#pending.subarray(offset);
  }

  /** Why the stream is broken, if it is. */
  get problem(): string | undefined {
    return this.#problem ?? (this.#closed ? `the connection closed after number ${this.#expected - 1n}` : undefined);
  }

  /** Starts a new window: numbers and stalls are counted from here. */
  mark(): void {
    this.#windowStart = { numbers: this.#expected, longestStallMs: 0 };
  }

  /** The window since mark(), once `minNumbers` more numbers arrived (or `timeoutMs` passed). */
  async window(minNumbers = 20, timeoutMs = 15_000): Promise<StreamWindow> {
    const target = this.#expected + BigInt(minNumbers);
    const deadline = Date.now() + timeoutMs;
    while (this.#expected < target && !this.#closed && Date.now() < deadline) await sleep(20);
    const numbers = Number(this.#expected - this.#windowStart.numbers);
    return { numbers, longestStallMs: this.#windowStart.longestStallMs, intact: this.problem === undefined && this.#expected >= target };
  }

  async close(): Promise<void> {
    if (this.#child.exitCode === null && this.#child.signalCode === null) {
      const closed = new Promise((resolve) => this.#child.once('close', resolve));
      this.#child.kill('SIGKILL');
      await closed;
    }
  }
}

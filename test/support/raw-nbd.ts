/**
 * A deliberately small, byte-level NBD client for sending the server malformed
 * or hostile input that real clients never send. Good input is tested with
 * real clients (qemu-io, qemu-img, nbdinfo, nbdcopy) instead.
 */
import { connect, type Socket } from 'node:net';

export class RawNbdConnection {
  readonly socket: Socket;
  #buffer = Buffer.alloc(0);
  #waiters: (() => void)[] = [];
  closed = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.#buffer = Buffer.concat([this.#buffer, chunk]);
      this.#wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.#wake();
    });
    socket.on('error', () => undefined);
  }

  static open(port: number): Promise<RawNbdConnection> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port }, () => resolve(new RawNbdConnection(socket)));
      socket.once('error', reject);
    });
  }

  /** Reads exactly n bytes, or undefined if the server closed first (or after timeoutMs). */
  async read(n: number, timeoutMs = 5000): Promise<Buffer | undefined> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buffer.length < n) {
      if (this.closed || Date.now() > deadline) return undefined;
      await new Promise<void>((resolve) => {
        this.#waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
    const out = this.#buffer.subarray(0, n);
    this.#buffer = this.#buffer.subarray(n);
    return out;
  }

  write(data: Buffer): void {
    this.socket.write(data);
  }

  /** Greeting, client flags, then NBD_OPT_GO for `exportName` with structured replies off. */
  async handshake(exportName: string): Promise<{ size: bigint; flags: number }> {
    await this.read(18);
    this.write(u32(3));
    const name = Buffer.from(exportName);
    this.write(Buffer.concat([u64(0x49484156454f5054n), u32(7), u32(4 + name.length + 2), u32(name.length), name, u16(0)]));
    let size = 0n;
    let flags = 0;
    for (;;) {
      const header = await this.read(20);
      if (!header) throw new Error('server closed during the handshake');
      const type = header.readUInt32BE(12);
      const data = (await this.read(header.readUInt32BE(16))) ?? Buffer.alloc(0);
      if (type === 3 && data.readUInt16BE(0) === 0) {
        size = data.readBigUInt64BE(2);
        flags = data.readUInt16BE(10);
      }
      if (type === 1) return { size, flags };
      if (type >= 2 ** 31) throw new Error(`option error ${type}: ${data.toString()}`);
    }
  }

  /** Sends one request and returns the errno of its simple reply (undefined if the server hung up). */
  async request(type: number, offset: bigint, length: number, options: { flags?: number; magic?: number; payload?: Buffer } = {}): Promise<number | undefined> {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(options.magic ?? 0x25609513, 0);
    header.writeUInt16BE(options.flags ?? 0, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(0xabcdn, 8);
    header.writeBigUInt64BE(offset, 16);
    header.writeUInt32BE(length, 24);
    this.write(options.payload ? Buffer.concat([header, options.payload]) : header);
    const reply = await this.read(16);
    if (!reply) return undefined;
    const errno = reply.readUInt32BE(4);
    if (errno === 0 && type === 0) await this.read(length);
    return errno;
  }

  close(): void {
    this.socket.destroy();
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }
}

export function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  return b;
}

export function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  return b;
}

export function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  return b;
}

/**
 * An in-memory NBD export for protocol tests: no files, no catalog, and hooks
 * to hold a request until the test releases it or to make it fail on purpose.
 */
import pino from 'pino';
import type { ExportInfo, ExportProvider, Extent, NbdBackend } from '../../src/nbd/backend.ts';
import { STATE_HOLE, STATE_ZERO } from '../../src/nbd/constants.ts';
import { NbdServer, defaultLimits } from '../../src/nbd/server.ts';
import type { TransmissionLimits } from '../../src/nbd/transmission.ts';

export type Hook = (op: string, offset: number, length: number) => Promise<void> | void;

export class MemoryBackend implements NbdBackend {
  readonly data: Buffer;
  readonly readOnly: boolean;
  /** Runs before each operation; may wait (to reorder replies) or throw (to fail it). */
  hook: Hook | undefined;
  running = 0;
  maxRunning = 0;

  constructor(size: number, readOnly = false) {
    this.data = Buffer.alloc(size);
    this.readOnly = readOnly;
  }

  get size(): number {
    return this.data.length;
  }

  async #op<T>(op: string, offset: number, length: number, work: () => T): Promise<T> {
    this.running++;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    try {
      await this.hook?.(op, offset, length);
      return work();
    } finally {
      this.running--;
    }
  }

  read(offset: number, target: Buffer): Promise<void> {
    return this.#op('read', offset, target.length, () => void this.data.copy(target, 0, offset, offset + target.length));
  }

  write(offset: number, data: readonly Buffer[], _fua: boolean): Promise<void> {
    const length = data.reduce((n, b) => n + b.length, 0);
    return this.#op('write', offset, length, () => {
      let at = offset;
      for (const piece of data) at += piece.copy(this.data, at);
    });
  }

  writeZeroes(offset: number, length: number, _fua: boolean, _noHole: boolean): Promise<void> {
    return this.#op('zero', offset, length, () => void this.data.fill(0, offset, offset + length));
  }

  trim(offset: number, length: number): Promise<void> {
    return this.#op('trim', offset, length, () => undefined);
  }

  flush(): Promise<void> {
    return this.#op('flush', 0, 0, () => undefined);
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    // 4 KiB granularity: all-zero blocks are holes.
    return this.#op('status', offset, length, () => {
      const extents: Extent[] = [];
      for (let at = offset; at < offset + length; ) {
        const end = Math.min(offset + length, (Math.floor(at / 4096) + 1) * 4096);
        const zero = this.data.subarray(at, end).every((b) => b === 0);
        const flags = zero ? STATE_HOLE | STATE_ZERO : 0;
        const last = extents[extents.length - 1];
        if (last && last.flags === flags) last.length += end - at;
        else extents.push({ length: end - at, flags });
        at = end;
      }
      return extents;
    });
  }
}

export class MemoryExports implements ExportProvider {
  readonly backends = new Map<string, MemoryBackend>();
  readonly attached: string[] = [];

  list(): ExportInfo[] {
    return [...this.backends.keys()].map((name) => ({ name, description: `memory ${name}` }));
  }

  has(name: string): boolean {
    return this.backends.has(name);
  }

  open(name: string, client: string): Promise<NbdBackend | undefined> {
    const backend = this.backends.get(name);
    if (backend) this.attached.push(`${name} ${client}`);
    return Promise.resolve(backend);
  }

  release(name: string, client: string): void {
    const i = this.attached.indexOf(`${name} ${client}`);
    if (i >= 0) this.attached.splice(i, 1);
  }
}

/** An NbdServer on a free loopback port over memory exports. */
export async function startMemoryServer(exports: Record<string, MemoryBackend>, limits: Partial<TransmissionLimits> = {}): Promise<{ server: NbdServer; port: number; exports: MemoryExports }> {
  const provider = new MemoryExports();
  for (const [name, backend] of Object.entries(exports)) provider.backends.set(name, backend);
  const server = new NbdServer(provider, pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }), { ...defaultLimits, ...limits });
  const port = await server.listenTcp('127.0.0.1', 0);
  return { server, port, exports: provider };
}

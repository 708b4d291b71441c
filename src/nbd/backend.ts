/**
 * What the NBD server asks of the storage behind an export. The protocol code
 * knows nothing else about volumes; read-only, fencing or fault injection are
 * layers that implement this same interface around another backend.
 */

import type { Extent } from './codec.ts';

export type { Extent };

/** An error a backend raises on purpose, carried to the client as this NBD errno. */
export class NbdBackendError extends Error {
  readonly errno: number;

  constructor(errno: number, message: string) {
    super(message);
    this.name = 'NbdBackendError';
    this.errno = errno;
  }
}

export interface NbdBackend {
  readonly size: number;
  readonly readOnly: boolean;
  /**
   * Fills all of `target` with the export's bytes from `offset`. `target` is the server's, used again for
   * later requests (buffer-pool.ts): nothing may touch it once the promise has settled, and nothing may keep it.
   */
  read(offset: number, target: Buffer): Promise<void>;
  /**
   * `data` is the payload as it arrived, in pieces: written with one writev, never concatenated. Its buffers
   * may be the server's, used again for later payloads (reused-buffer-reader.ts): nothing may touch them once
   * the promise has settled, and nothing may keep them.
   */
  write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void>;
  /** Zeroes a range; it may become a hole unless `noHole` (NBD_CMD_FLAG_NO_HOLE) asks to keep it allocated. */
  writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  /** Makes every completed write durable, whichever connection made it. */
  flush(): Promise<void>;
  blockStatus(offset: number, length: number): Promise<Extent[]>;
}

export interface ExportInfo {
  name: string;
  description: string;
}

/** The exports a server offers; the storage server implements it over its volume catalog. */
export interface ExportProvider {
  list(): ExportInfo[];
  /** Whether a client may open `name`: a listed export, or a name the provider derives from one. */
  has(name: string): boolean;
  /** Opens an export for a new connection, or undefined if there is none of that name. */
  open(name: string, client: string): Promise<NbdBackend | undefined>;
  /** The connection that opened `name` has ended. */
  release(name: string, client: string): void;
}

/**
 * Backends for shared volumes: a sparse raw file, and thin layers over any
 * backend (read-only). Each is a few lines because the NBD server validated
 * every request before it gets here.
 */
import type { FileHandle } from 'node:fs/promises';
import { NbdBackendError, type Extent, type NbdBackend } from '../nbd/backend.ts';
import { NbdErrno, STATE_HOLE, STATE_ZERO } from '../nbd/constants.ts';

const zeroChunk = Buffer.alloc(1024 * 1024);

/** A volume's file; one handle shared by all connections, so FLUSH covers every connection's writes. */
export class FileBackend implements NbdBackend {
  readonly size: number;
  readonly readOnly = false;
  readonly #file: FileHandle;

  constructor(file: FileHandle, size: number) {
    this.#file = file;
    this.size = size;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buffer = Buffer.allocUnsafe(length);
    let filled = 0;
    while (filled < length) {
      const { bytesRead } = await this.#file.read(buffer, filled, length - filled, offset + filled);
      // Past the end of a sparse file that was grown: zeros.
      if (bytesRead === 0) {
        buffer.fill(0, filled);
        break;
      }
      filled += bytesRead;
    }
    return buffer;
  }

  async write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void> {
    const pending = [...data];
    let position = offset;
    while (pending.length > 0) {
      let { bytesWritten } = await this.#file.writev(pending, position);
      position += bytesWritten;
      // A short writev leaves the rest for another round.
      while (pending.length > 0 && bytesWritten >= (pending[0] as Buffer).length) bytesWritten -= (pending.shift() as Buffer).length;
      if (pending.length > 0 && bytesWritten > 0) pending[0] = (pending[0] as Buffer).subarray(bytesWritten);
    }
    if (fua) await this.#file.datasync();
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    // Node has no fallocate(PUNCH_HOLE): zeroes are written out.
    for (let done = 0; done < length; done += zeroChunk.length) {
      const step = Math.min(zeroChunk.length, length - done);
      await this.write(offset + done, [zeroChunk.subarray(0, step)], false);
    }
    if (fua) await this.#file.datasync();
  }

  async trim(_offset: number, _length: number, fua: boolean): Promise<void> {
    // TRIM is advisory; keeping the data is a valid answer.
    if (fua) await this.#file.datasync();
  }

  async flush(): Promise<void> {
    await this.#file.datasync();
  }

  async blockStatus(_offset: number, length: number): Promise<Extent[]> {
    // Without SEEK_DATA we know holes only for a file with no blocks at all.
    const stats = await this.#file.stat();
    return [{ length, flags: stats.blocks === 0 ? STATE_HOLE | STATE_ZERO : 0 }];
  }
}

/** Refuses every write with EPERM, whatever the backend below would do. */
export class ReadOnlyBackend implements NbdBackend {
  readonly readOnly = true;
  readonly #next: NbdBackend;

  constructor(next: NbdBackend) {
    this.#next = next;
  }

  get size(): number {
    return this.#next.size;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.#next.read(offset, length);
  }

  write(): Promise<void> {
    return Promise.reject(new NbdBackendError(NbdErrno.EPERM, 'the volume is read-only'));
  }

  writeZeroes(): Promise<void> {
    return this.write();
  }

  trim(): Promise<void> {
    return this.write();
  }

  flush(): Promise<void> {
    return this.#next.flush();
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#next.blockStatus(offset, length);
  }
}

/**
 * Backends for shared volumes: a sparse raw file, and thin layers over any
 * backend (sticky write errors, read-only, writer fencing). Each is a few
 * lines because the NBD server validated every request before it gets here.
 */
import { read as readFd, writev as writevFd } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { NbdBackendError, type Extent, type NbdBackend } from '../nbd/backend.ts';
import { NbdErrno, STATE_HOLE, STATE_ZERO } from '../nbd/constants.ts';
import type { CachedRead } from './cached-read.ts';
import { FsHelperError, type FsHelper } from './fs-helper.ts';
import type { WriterLeases } from './writer-leases.ts';

const zeroChunk = Buffer.alloc(1024 * 1024);

/** True when the helper cannot do this here (gone, or the file system lacks the operation): fall back. */
function helperUnusable(err: unknown, helper: FsHelper): boolean {
  return !helper.available || (err instanceof FsHelperError && (err.code === 'EOPNOTSUPP' || err.code === 'ENOSYS'));
}

/**
 * A volume's file; one handle shared by all connections, so FLUSH (fdatasync)
 * covers every connection's writes. Holes, zeroing and the allocation map go
 * through the file-system helper when there is one; it reaches the file
 * through this process's descriptor, never its name, so it works on the very
 * file this handle has open even if the name now belongs to another.
 */
export class FileBackend implements NbdBackend {
  readonly size: number;
  readonly readOnly = false;
  readonly #file: FileHandle;
  readonly #path: string;
  readonly #helper: FsHelper | undefined;
  readonly #cachedRead: CachedRead | undefined;

  constructor(file: FileHandle, size: number, helper: FsHelper | undefined, cachedRead?: CachedRead) {
    this.#file = file;
    this.size = size;
    this.#path = `/proc/${process.pid}/fd/${file.fd}`;
    this.#helper = helper;
    this.#cachedRead = cachedRead;
  }

  /**
   * What the page cache holds is copied at once (cached-read.ts); the rest
   * is read through the descriptor with fs.read's callback, which spares the
   * event loop FileHandle.read's promise machinery on every request.
   * The handle stays open meanwhile: volumes.ts closes it only once every
   * connection using it has ended, after their requests finished.
   */
  read(offset: number, target: Buffer): Promise<void> {
    const fd = this.#file.fd;
    const length = target.length;
    let cached = 0;
    if (this.#cachedRead) {
      for (let copied = -1; copied !== 0 && cached < length; cached += copied) copied = this.#cachedRead(fd, target, cached, length - cached, offset + cached);
    }
    if (cached === length) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const readFrom = (filled: number): void => {
        readFd(fd, target, filled, length - filled, offset + filled, (err, bytesRead) => {
          if (err) reject(err);
          // Past the end of a sparse file that was grown: zeros (the target holds an earlier request's bytes).
          else if (bytesRead === 0) {
            target.fill(0, filled);
            resolve();
          } else if (filled + bytesRead < length) readFrom(filled + bytesRead);
          else resolve();
        });
      };
      readFrom(cached);
    });
  }

  /** Through the descriptor and fs.writev's callback, as read() and for the same reason. */
  write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void> {
    const fd = this.#file.fd;
    const written = new Promise<void>((resolve, reject) => {
      const writeFrom = (pending: Buffer[], position: number): void => {
        writevFd(fd, pending, position, (err, bytesWritten) => {
          if (err) {
            reject(err);
            return;
          }
          // A short writev leaves the rest for another round.
          let left = bytesWritten;
          while (pending.length > 0 && left >= (pending[0] as Buffer).length) left -= (pending.shift() as Buffer).length;
          if (pending.length > 0 && left > 0) pending[0] = (pending[0] as Buffer).subarray(left);
          if (pending.length > 0) writeFrom(pending, position + bytesWritten);
          else resolve();
        });
      };
      writeFrom([...data], offset);
    });
    return fua ? written.then(() => this.#file.datasync()) : written;
  }

  async writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    if (!(await this.#zeroWithHelper(offset, length, noHole))) {
      for (let done = 0; done < length; done += zeroChunk.length) {
        const step = Math.min(zeroChunk.length, length - done);
        await this.write(offset + done, [zeroChunk.subarray(0, step)], false);
      }
    }
    if (fua) await this.#file.datasync();
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    // TRIM is advisory: where holes cannot be punched, keeping the data is a valid answer.
    if (this.#helper?.available) {
      try {
        await this.#helper.punchHole(this.#path, offset, length);
      } catch (err) {
        if (!helperUnusable(err, this.#helper)) throw err;
      }
    }
    if (fua) await this.#file.datasync();
  }

  async flush(): Promise<void> {
    await this.#file.datasync();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (this.#helper?.available) {
      try {
        const extents = await this.#helper.map(this.#path, offset, length);
        if (extents.length > 0) return extents;
      } catch (err) {
        if (!helperUnusable(err, this.#helper)) throw err;
      }
    }
    // Without SEEK_DATA we know holes only for a file with no blocks at all.
    const stats = await this.#file.stat();
    return [{ length, flags: stats.blocks === 0 ? STATE_HOLE | STATE_ZERO : 0 }];
  }

  /** Punches a hole (or zeroes in place, for NO_HOLE); false when the helper cannot, so zeros must be written. */
  async #zeroWithHelper(offset: number, length: number, noHole: boolean): Promise<boolean> {
    if (!this.#helper?.available) return false;
    try {
      if (noHole) await this.#helper.zeroRange(this.#path, offset, length);
      else await this.#helper.punchHole(this.#path, offset, length);
      return true;
    } catch (err) {
      if (helperUnusable(err, this.#helper)) return false;
      throw err;
    }
  }
}

/**
 * What the connections of one open volume share besides its file. Linux
 * reports a failed writeback to one fdatasync only, and the file handle is
 * shared: without this, a FLUSH on one connection could consume the error and
 * the writer's own FLUSH would then succeed over lost data.
 */
export class VolumeHealth {
  /** The first failed write or sync since the volume was opened; every later FLUSH fails with it. */
  writeError: Error | undefined;
  /** Set when the volume was deleted (forced) under its connections: nothing reaches the unlinked file any more. */
  deleted = false;
}

function deletedVolume<T>(): Promise<T> {
  return Promise.reject(new NbdBackendError(NbdErrno.EIO, 'the volume was deleted'));
}

/**
 * Makes a failed write or sync sticky: from then on every FLUSH on the volume,
 * from any connection, fails with EIO until all its connections are gone and it
 * is opened afresh. Also refuses every request once the volume was deleted.
 */
export class StickyErrorBackend implements NbdBackend {
  readonly #next: NbdBackend;
  readonly #health: VolumeHealth;

  constructor(next: NbdBackend, health: VolumeHealth) {
    this.#next = next;
    this.#health = health;
  }

  get size(): number {
    return this.#next.size;
  }

  get readOnly(): boolean {
    return this.#next.readOnly;
  }

  read(offset: number, target: Buffer): Promise<void> {
    return this.#health.deleted ? deletedVolume() : this.#next.read(offset, target);
  }

  write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void> {
    return this.#latch(() => this.#next.write(offset, data, fua));
  }

  writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    return this.#latch(() => this.#next.writeZeroes(offset, length, fua, noHole));
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#latch(() => this.#next.trim(offset, length, fua));
  }

  flush(): Promise<void> {
    const failed = this.#health.writeError;
    if (failed) {
      return Promise.reject(new NbdBackendError(NbdErrno.EIO, `an earlier write to this volume failed (${failed.message}); it cannot be flushed until every client has reconnected`));
    }
    return this.#latch(() => this.#next.flush());
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#health.deleted ? deletedVolume() : this.#next.blockStatus(offset, length);
  }

  #latch(operation: () => Promise<void>): Promise<void> {
    const done = this.#health.deleted ? deletedVolume<void>() : operation();
    return done.catch((err: unknown) => {
      this.#health.writeError ??= err as Error;
      throw err;
    });
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

  read(offset: number, target: Buffer): Promise<void> {
    return this.#next.read(offset, target);
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

/** Lets a write through only while this connection's token holds the volume's writer lease (see writer-leases.ts). */
export class FencedBackend implements NbdBackend {
  readonly #next: NbdBackend;
  readonly #leases: WriterLeases;
  readonly #volume: string;
  readonly #token: string | undefined;

  constructor(next: NbdBackend, leases: WriterLeases, volume: string, token: string | undefined) {
    this.#next = next;
    this.#leases = leases;
    this.#volume = volume;
    this.#token = token;
  }

  get size(): number {
    return this.#next.size;
  }

  get readOnly(): boolean {
    return this.#next.readOnly;
  }

  read(offset: number, target: Buffer): Promise<void> {
    return this.#next.read(offset, target);
  }

  write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void> {
    return this.#leases.write(this.#volume, this.#token, () => this.#next.write(offset, data, fua));
  }

  writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    return this.#leases.write(this.#volume, this.#token, () => this.#next.writeZeroes(offset, length, fua, noHole));
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#leases.write(this.#volume, this.#token, () => this.#next.trim(offset, length, fua));
  }

  flush(): Promise<void> {
    return this.#next.flush();
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#next.blockStatus(offset, length);
  }
}

/**
 * Punch-hole, zero-range and SEEK_DATA/SEEK_HOLE for volume files. Node's fs
 * has none of them, so a tiny C program (native/fshelper.c, built with the
 * system's cc on first use into build/native/) does them for the whole
 * server: one long-lived child, requests pipelined as lines over its stdin.
 * Without a C compiler the helper is unavailable and callers fall back to
 * writing zeros and reporting everything as data, which is slower but correct.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { Logger } from 'pino';
import type { Extent } from '../nbd/backend.ts';
import { STATE_HOLE, STATE_ZERO } from '../nbd/constants.ts';
import { buildNative } from '../util/native-build.ts';

/** An error the helper reported, with the errno name Node uses (EOPNOTSUPP, ENOSPC, …) as its code. */
export class FsHelperError extends Error {
  readonly code: string;

  constructor(code: string, what: string) {
    super(`${what}: ${code}`);
    this.name = 'FsHelperError';
    this.code = code;
  }
}

const errnoNames: Record<number, string> = {
  1: 'EPERM', 2: 'ENOENT', 5: 'EIO', 9: 'EBADF', 13: 'EACCES', 22: 'EINVAL', 27: 'EFBIG', 28: 'ENOSPC', 30: 'EROFS', 38: 'ENOSYS', 95: 'EOPNOTSUPP',
};

/** Builds the helper if it is missing or older than its source; returns its path, or undefined without a compiler. */
async function buildFsHelper(logger: Logger): Promise<string | undefined> {
  try {
    const binary = await buildNative(join(import.meta.dirname, 'native', 'fshelper.c'), 'vmferry-fshelper', []);
    logger.debug({ binary }, 'the file-system helper is built');
    return binary;
  } catch (err) {
    logger.warn({ err: (err as Error).message }, 'cannot build the file-system helper (no C compiler?): TRIM and WRITE_ZEROES write zeros, BLOCK_STATUS reports data');
    return undefined;
  }
}

export class FsHelper {
  readonly #child: ChildProcessWithoutNullStreams;
  readonly #logger: Logger;
  readonly #pending = new Map<number, { resolve: (fields: string[]) => void; reject: (err: Error) => void; what: string }>();
  #nextId = 1;
  #dead: Error | undefined;
  #closing = false;

  private constructor(child: ChildProcessWithoutNullStreams, logger: Logger) {
    this.#child = child;
    this.#logger = logger;
    createInterface({ input: child.stdout }).on('line', (line) => this.#onLine(line));
    child.stderr.on('data', (data: Buffer) => logger.error({ stderr: data.toString().trim() }, 'file-system helper'));
    child.on('error', (err) => this.#die(err));
    child.on('exit', (code, signal) => this.#die(new Error(`file-system helper exited (${signal ?? code})`)));
    child.stdin.on('error', () => undefined);
  }

  /** Starts the helper, or returns undefined when it cannot be built. */
  static async start(logger: Logger): Promise<FsHelper | undefined> {
    const path = await buildFsHelper(logger);
    if (!path) return undefined;
    return new FsHelper(spawn(path, [], { stdio: ['pipe', 'pipe', 'pipe'] }), logger);
  }

  get available(): boolean {
    return this.#dead === undefined;
  }

  /** Deallocates a range (reads as zeros afterwards); the file keeps its size. */
  async punchHole(path: string, offset: number, length: number): Promise<void> {
    await this.#call('P', path, offset, length);
  }

  /** Zeroes a range and keeps it allocated. */
  async zeroRange(path: string, offset: number, length: number): Promise<void> {
    await this.#call('Z', path, offset, length);
  }

  /** Data and hole extents from `offset`, up to `length` or 1024 extents, whichever comes first. */
  async map(path: string, offset: number, length: number): Promise<Extent[]> {
    const fields = await this.#call('M', path, offset, length);
    return fields.map((field) => {
      const [size, hole] = field.split(':');
      return { length: Number(size), flags: hole === '1' ? STATE_HOLE | STATE_ZERO : 0 };
    });
  }

  /** Ends the helper once it has answered what it was asked. */
  close(): void {
    this.#closing = true;
    this.#child.stdin.end();
  }

  #call(op: string, path: string, offset: number, length: number): Promise<string[]> {
    if (this.#dead) return Promise.reject(this.#dead);
    if (/[\n\r]/.test(path)) return Promise.reject(new FsHelperError('EINVAL', `path with a newline: ${JSON.stringify(path)}`));
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, what: `${op} ${offset}+${length} of ${path}` });
      this.#child.stdin.write(`${id} ${op} ${offset} ${length} ${path}\n`);
    });
  }

  #onLine(line: string): void {
    const [id, status, ...fields] = line.split(' ');
    const pending = this.#pending.get(Number(id));
    if (!pending) {
      this.#logger.error({ line }, 'file-system helper answered an unknown request');
      return;
    }
    this.#pending.delete(Number(id));
    if (status === '0') pending.resolve(fields);
    else {
      const errno = -Number(status);
      pending.reject(new FsHelperError(errnoNames[errno] ?? `errno ${errno}`, pending.what));
    }
  }

  #die(err: Error): void {
    if (this.#dead) return;
    this.#dead = err;
    if (!this.#closing) this.#logger.warn({ err: err.message }, 'file-system helper gone: falling back to writing zeros');
    for (const pending of this.#pending.values()) pending.reject(err);
    this.#pending.clear();
  }
}

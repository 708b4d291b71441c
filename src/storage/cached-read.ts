/**
 * Reads served from the page cache on the event loop itself: the native addon's preadv2(RWF_NOWAIT)
 * (native/cached-read.c) copies what is cached and never waits for a disk, so only what is not cached
 * takes the hop to libuv's thread pool. Without a C compiler or Node's headers every read takes the hop,
 * as before: slower, equally correct.
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import { loadAddon } from '../util/native-build.ts';

/**
 * Copies into buffer[offset, offset + length) what the page cache holds of the file from `position` on, without
 * waiting: the bytes copied, 0 where nothing could be (not cached, end of file, or an error the thread pool's read
 * then reports).
 */
export type CachedRead = (fd: number, buffer: Buffer, offset: number, length: number, position: number) => number;

interface CachedReadAddon {
  readCached(fd: number, buffer: Buffer, offset: number, length: number, position: number): number;
}

export async function loadCachedRead(logger: Logger): Promise<CachedRead | undefined> {
  try {
    const addon = await loadAddon<CachedReadAddon>(join(import.meta.dirname, 'native', 'cached-read.c'), 'vmferry-cached-read.node');
    return (fd, buffer, offset, length, position) => Math.max(0, addon.readCached(fd, buffer, offset, length, position));
  } catch (err) {
    logger.warn({ err: (err as Error).message }, 'cannot build the cached-read addon (no C compiler or Node headers?): every read goes through the thread pool');
    return undefined;
  }
}

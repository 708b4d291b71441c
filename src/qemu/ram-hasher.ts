/**
 * Hashes chunks of guest RAM for memory digests in native code (native/ram-hash.c): each chunk is copied out of
 * QEMU with process_vm_readv (or read from a memfd or dump) on libuv's threads and hashed while it is in the CPU's
 * cache. In JavaScript, reading /proc/PID/mem and hashing with WebAssembly, the same digest took about twice as long
 * while the guest was paused (docs/BENCHMARKS.md, issue 22).
 */
import { open } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';
import { loadAddon } from '../util/native-build.ts';

/** Where the chunks are: a process's memory from `address` on, or an open file (memfd or dump) from offset `address` on. */
export type RamChunkSource = { pid: number; address: number } | { fd: number; address: number };

interface RamHashAddon {
  hashChunks(pid: number, fd: number, base: number, chunkBytes: number, chunks: Uint32Array, hashes: BigUint64Array): Promise<void>;
}

let addon: Promise<RamHashAddon> | undefined;

/**
 * Builds (when its source is newer than the build) and loads the addon once per process. Called when a guest's RAM
 * is located, before it is paused, so a compiler's time is never inside a pause. A failure is not kept: the next
 * call tries again.
 */
export function loadRamHasher(): Promise<RamHashAddon> {
  addon ??= loadAddon<RamHashAddon>(join(import.meta.dirname, 'native', 'ram-hash.c'), 'vmferry-ram-hash.node').catch((err: unknown) => {
    addon = undefined;
    throw new VmferryError('VMF_MIGRATION_FAILED', `cannot build or load the memory digest's hasher (scripts/setup.sh installs gcc and libxxhash-dev): ${(err as Error).message.trim()}`);
  });
  return addon;
}

/** XXH64 (seed 0) of each of `chunks` (indexes of `chunkBytes`-byte chunks from `source.address` on), in order, as hex. */
export async function hashRamChunks(source: RamChunkSource, chunkBytes: number, chunks: readonly number[]): Promise<string[]> {
  const native = await loadRamHasher();
  // Two threads: on a host of its own an end copies twice as fast; where both ends share one, each gets a core.
  const threads = Math.max(1, Math.min(2, availableParallelism(), chunks.length));
  const perThread = Math.ceil(chunks.length / threads);
  const hashes = new BigUint64Array(chunks.length);
  const pid = 'pid' in source ? source.pid : 0;
  const fd = 'fd' in source ? source.fd : -1;
  await Promise.all(
    Array.from({ length: threads }, (_, thread) => {
      const first = Math.min(chunks.length, thread * perThread);
      const last = Math.min(chunks.length, first + perThread);
      return native.hashChunks(pid, fd, source.address, chunkBytes, Uint32Array.from(chunks.slice(first, last)), hashes.subarray(first, last));
    }),
  );
  return Array.from(hashes, (hash) => hash.toString(16).padStart(16, '0'));
}

const zeroChunkHashes = new Map<number, Promise<string>>();

/** The hash of a chunk of zeros, through the same hasher (from /dev/zero), for chunks known to be zero without a read. */
export function hashOfZeros(chunkBytes: number): Promise<string> {
  let hash = zeroChunkHashes.get(chunkBytes);
  if (!hash) {
    hash = (async () => {
      const zeros = await open('/dev/zero', 'r');
      try {
        return (await hashRamChunks({ fd: zeros.fd, address: 0 }, chunkBytes, [0]))[0]!;
      } finally {
        await zeros.close();
      }
    })();
    zeroChunkHashes.set(chunkBytes, hash);
    hash.catch(() => zeroChunkHashes.delete(chunkBytes));
  }
  return hash;
}

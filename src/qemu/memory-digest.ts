/**
 * A digest of a stopped guest's RAM, one hash per MiB, to compare the two ends
 * of a migration before the destination runs.
 *
 * Why: QEMU 7.2 under TCG loses guest memory writes when pre-copy needs more
 * than a few passes. The destination's RAM then differs from the source's in
 * a few dozen pages and the guest crashes or corrupts data once it resumes
 * (docs/QEMU-TCG-PRECOPY.md has the reproduction). KVM tracks dirty pages in
 * the kernel and is not affected.
 */
import { open, readdir, readlink, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';
import type { QemuProcess } from './process.ts';
import { hashOfZeros, hashRamChunks, loadRamHasher } from './ram-hasher.ts';

export const memoryDigestChunkBytes = 1024 * 1024;

/**
 * Guests up to this size have their RAM at guest-physical [0, size) on both
 * q35 and pc; larger ones are split around the PCI hole below 4 GiB.
 */
export const memoryDigestMaxMiB = 2048;

/**
 * XXH64: the comparison looks for accidental differences (pages QEMU failed to
 * resend), not for an adversary, and it runs while the guest is paused, where
 * SHA-256 cost several times as much CPU (docs/BENCHMARKS.md, "Figures from code comments").
 */
export const memoryDigestAlgorithm = 'xxh64';

export interface MemoryDigest {
  algorithm: string;
  chunkBytes: number;
  /** One hex hash per chunk, in address order. */
  chunks: string[];
}

/**
 * Where a digest reads a guest's RAM: the memfd of a QEMU started with its RAM in one (agents of earlier versions
 * started TCG guests so), QEMU's own address space (from the host address of guest address 0, with process_vm_readv;
 * `path`, /proc/PID/mem, is for the page-writing tests and tells whether the kernel lets the agent read there at all:
 * both need the same ptrace access), or, where it does not, a pmemsave dump (slower: QEMU copies 1 KiB at a time).
 */
type GuestRamSource = { kind: 'memfd'; path: string } | { kind: 'process'; path: string; address: number } | { kind: 'dump' };

/**
 * Per QEMU: where its RAM is does not change while it runs (RAM blocks are mapped once, at start), so it is found
 * once, before the guest is paused (locateGuestRam), not inside the pause: the fd scan and the HMP round trip took
 * tens of ms there, with both QEMUs busy (docs/BENCHMARKS.md, "Issue 22", where the comparison's time goes).
 */
const locations = new WeakMap<QemuProcess, Promise<GuestRamSource>>();
const addresses = new WeakMap<QemuProcess, Promise<number>>();

/** Memoizes `find` per QEMU; a failure is forgotten, so the next call tries again and reports its own error. */
function once<T>(cache: WeakMap<QemuProcess, Promise<T>>, vm: QemuProcess, find: () => Promise<T>): Promise<T> {
  let found = cache.get(vm);
  if (!found) {
    found = find();
    cache.set(vm, found);
    found.catch(() => {
      if (cache.get(vm) === found) cache.delete(vm);
    });
  }
  return found;
}

/**
 * Finds where `vm`'s RAM is read from, ahead of its digest: the source calls it when its migration starts, the
 * destination when its QEMU is ready for the incoming stream.
 */
export function locateGuestRam(vm: QemuProcess): Promise<GuestRamSource> {
  return once(locations, vm, async () => {
    // Built now, if it must be, so a compiler's time is never inside the pause.
    await loadRamHasher();
    const memfd = await guestRamMemfd(vm.pid);
    if (memfd) return { kind: 'memfd', path: memfd };
    const address = await guestRamAddress(vm);
    const path = `/proc/${vm.pid}/mem`;
    const readable = await open(path, 'r').then(
      (file) => file.close().then(() => true),
      () => false,
    );
    return readable ? { kind: 'process', path, address } : { kind: 'dump' };
  });
}

/**
 * Digest of the guest RAM of a VM whose vCPUs are stopped.
 *
 * Why not a memfd for every TCG guest, as before: every page of shared memory
 * that is read gets allocated, and pre-copy reads every page of RAM on both
 * ends to find the zero ones, so the first RAM pass took longer and each host
 * ended up holding all of the guest's RAM (docs/BENCHMARKS.md, "Issue 22").
 */
export async function memoryDigest(vm: QemuProcess, signal: AbortSignal): Promise<MemoryDigest> {
  if (vm.spec.memoryMiB > memoryDigestMaxMiB) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `VM ${vm.spec.name} has ${vm.spec.memoryMiB} MiB of RAM; memory digests cover guests up to ${memoryDigestMaxMiB} MiB`);
  }
  const size = vm.spec.memoryMiB * 1024 * 1024;
  // The status is not waited for before the reads: the source asks while its last RAM pass runs, and QEMU holds
  // its main loop for the whole pass (docs/BENCHMARKS.md, issue 22). Its vCPUs stopped before the digest was asked
  // for, and only the migration resumes them, so a stopped status at any point of the digest covers all of it.
  const stopped = vm.status().then((status) => {
    if (status.running) throw new VmferryError('VMF_CONFLICT', `VM ${vm.spec.name} is running: its memory can only be compared while stopped`);
  });
  const digest = locateGuestRam(vm).then(async (ram) => {
    if (ram.kind === 'dump') {
      // QEMU copies the RAM itself, in its main loop: only once it said the guest is stopped.
      await stopped;
      return dumpAndHash(vm, signal);
    }
    const skipped = ram.kind === 'process' ? await zeroChunks(vm.pid, ram.address, size) : new Set<number>();
    return hashChunks(ram.path, ram.kind === 'process' ? ram.address : 0, size, signal, skipped, ram.kind === 'process' ? vm.pid : undefined);
  });
  const [, result] = await Promise.all([stopped, digest]);
  return result;
}

export const pageBytes = 4096;

/**
 * The chunks of QEMU's memory at [address, address + size) that hold only zeros, known without a read
 * (/proc/PID/pagemap): every page is either absent (private memory never written, neither in memory nor
 * in swap) or mapped to the kernel's zero page. The second kind is most of a migrating guest's RAM on both
 * ends: pre-copy reads every page of the source to find the zero ones, and the destination reads each page
 * it is told is zero before deciding not to write it, and a read of never-written memory maps the zero page
 * (the huge one under transparent huge pages). Without that, both ends read and hashed all of the guest's
 * RAM while it was paused.
 */
export async function zeroChunks(pid: number, address: number, size: number): Promise<Set<number>> {
  const pagesPerChunk = memoryDigestChunkBytes / pageBytes;
  const pages = await pageTable(pid, address, size);
  const zero = new Set<number>();
  for (let chunk = 0; chunk < size / memoryDigestChunkBytes; chunk++) {
    let written = false;
    for (let page = chunk * pagesPerChunk; page < (chunk + 1) * pagesPerChunk && !written; page++) written = pages.mayHoldData(page);
    if (!written) zero.add(chunk);
  }
  return zero;
}

/**
 * The pages of QEMU's memory at [address, address + size) that may hold data, by /proc/PID/pagemap alone:
 * present or swapped out, and not the kernel's zero page. (A page the guest filled with zeros is among them.)
 */
export async function writtenPages(pid: number, address: number, size: number): Promise<number[]> {
  const pages = await pageTable(pid, address, size);
  const written: number[] = [];
  for (let page = 0; page < size / pageBytes; page++) if (pages.mayHoldData(page)) written.push(page);
  return written;
}

// Pagemap entry bits, in the entry's upper 32 bits: 63 present, 62 swapped out, 56 mapped exclusively; 0–54 the frame.
const presentBit = 0x80000000;
const swappedBit = 0x40000000;
const exclusiveBit = 0x01000000;
const frameHighBits = 0x7fffff;

interface PageTable {
  /** Whether a page may hold data: present or swapped out, and not the kernel's zero page. */
  mayHoldData(page: number): boolean;
}

/**
 * The pagemap entries of [address, address + size) of `pid`, and which of their frames are the kernel's zero page.
 * Read as 32-bit words, not with Buffer's readers: the scan covers every page of the guest and ran inside the pause.
 */
async function pageTable(pid: number, address: number, size: number): Promise<PageTable> {
  const pages = size / pageBytes;
  const words = new Uint32Array(pages * 2);
  const bytes = new Uint8Array(words.buffer);
  const file = await open(`/proc/${pid}/pagemap`, 'r');
  try {
    for (let done = 0; done < bytes.length; ) {
      const { bytesRead } = await file.read(bytes, done, bytes.length - done, (address / pageBytes) * 8 + done);
      if (bytesRead === 0) throw new VmferryError('VMF_MIGRATION_FAILED', `/proc/${pid}/pagemap ended early`);
      done += bytesRead;
    }
  } finally {
    await file.close();
  }
  const zeroFrames = await zeroPageFrames(words);
  return {
    mayHoldData(page: number): boolean {
      const high = words[page * 2 + 1]!;
      if ((high & (presentBit | swappedBit)) === 0) return false;
      // Only a present page not mapped exclusively can be the zero page: QEMU's own written RAM is exclusive.
      if ((high & presentBit) === 0 || (high & exclusiveBit) !== 0) return true;
      return !zeroFrames.has(frameNumber(words, page));
    },
  };
}

/** Bits 0–54 of a present page's pagemap entry; 0 where the reader may not see frame numbers (no CAP_SYS_ADMIN). */
function frameNumber(words: Uint32Array, page: number): number {
  return (words[page * 2 + 1]! & frameHighBits) * 2 ** 32 + words[page * 2]!;
}

const kpageflagsZeroPage = 1 << 24;

/**
 * The frames among the pagemap entries `words` that are the kernel's zero page or part of its huge zero page
 * (/proc/kpageflags). Only present pages not mapped exclusively (bit 56 clear) can be: QEMU's own written
 * RAM is. Empty where the agent may not read frame numbers or page flags, and every chunk is then read.
 */
async function zeroPageFrames(words: Uint32Array): Promise<Set<number>> {
  const candidates = new Set<number>();
  let previous = -1;
  for (let page = 0; page < words.length / 2; page++) {
    const high = words[page * 2 + 1]!;
    if ((high & presentBit) === 0 || (high & exclusiveBit) !== 0) continue;
    const frame = frameNumber(words, page);
    // The zero page backs long runs of pages: one lookup for a run.
    if (frame !== previous) candidates.add(frame);
    previous = frame;
  }
  candidates.delete(0);
  const zero = new Set<number>();
  if (candidates.size === 0) return zero;
  const flags = await open('/proc/kpageflags', 'r').catch(() => undefined);
  if (!flags) return zero;
  try {
    const sorted = [...candidates].sort((a, b) => a - b);
    // The huge zero page is one run of consecutive frames: read runs, not frames one by one.
    for (let first = 0; first < sorted.length; ) {
      let last = first;
      while (last + 1 < sorted.length && sorted[last + 1] === sorted[last]! + 1) last++;
      const run = new Uint32Array((last - first + 1) * 2);
      const { bytesRead } = await flags.read(new Uint8Array(run.buffer), 0, run.byteLength, sorted[first]! * 8);
      for (let i = 0; i < bytesRead / 8; i++) {
        if ((run[i * 2]! & kpageflagsZeroPage) !== 0) zero.add(sorted[first]! + i);
      }
      first = last + 1;
    }
  } finally {
    await flags.close();
  }
  return zero;
}

/**
 * Where guest address 0 is in QEMU's address space. Guest RAM up to
 * memoryDigestMaxMiB is one block from there on, in q35 and pc alike.
 */
export function guestRamAddress(vm: QemuProcess): Promise<number> {
  return once(addresses, vm, async () => {
    const text = await vm.qmp('finding guest RAM', (qmp) => qmp.client.execute<string>('human-monitor-command', { 'command-line': 'gpa2hva 0' }));
    const match = /is (0x[0-9a-f]+)/.exec(text);
    if (!match) throw new VmferryError('VMF_MIGRATION_FAILED', `QEMU of VM ${vm.spec.name} did not say where guest RAM is: ${text.trim()}`);
    return Number(match[1]);
  });
}

/** QEMU names the memfd of a memory-backend-memfd after the backend type; a guest has one. */
async function guestRamMemfd(pid: number): Promise<string | undefined> {
  const fdDir = `/proc/${pid}/fd`;
  for (const fd of await readdir(fdDir).catch(() => [])) {
    const target = await readlink(join(fdDir, fd)).catch(() => '');
    if (target.startsWith('/memfd:memory-backend-memfd')) return join(fdDir, fd);
  }
  return undefined;
}

async function dumpAndHash(vm: QemuProcess, signal: AbortSignal): Promise<MemoryDigest> {
  const size = vm.spec.memoryMiB * 1024 * 1024;
  const dump = join(vm.runDir, 'memory.dump');
  try {
    // pmemsave writes the whole range before it replies; QEMU's main loop is busy meanwhile, but the guest is stopped.
    await vm.qmp('dumping guest memory', (qmp) => qmp.client.execute('pmemsave', { val: 0, size, filename: dump }, { signal }));
    return await hashChunks(dump, 0, size, signal);
  } finally {
    await rm(dump, { force: true });
  }
}

/**
 * Hashes `size` bytes of guest RAM from `base` on, chunk by chunk: in QEMU's memory when `pid` is given, else in the
 * file `path`; `zeroChunks` are known to hold only zeros and are not read.
 */
async function hashChunks(path: string, base: number, size: number, signal: AbortSignal, zeroChunks = new Set<number>(), pid?: number): Promise<MemoryDigest> {
  if (size % memoryDigestChunkBytes !== 0) throw new VmferryError('VMF_INVALID_ARGUMENT', `guest RAM of ${size} bytes is not whole chunks of ${memoryDigestChunkBytes} bytes`);
  const chunks = new Array<string>(size / memoryDigestChunkBytes);
  const zeroHash = await hashOfZeros(memoryDigestChunkBytes);
  const toRead: number[] = [];
  for (let index = 0; index < chunks.length; index++) {
    if (zeroChunks.has(index)) chunks[index] = zeroHash;
    else toRead.push(index);
  }
  let hashes: string[];
  if (pid !== undefined) {
    hashes = await hashRamChunks({ pid, address: base }, memoryDigestChunkBytes, toRead);
  } else {
    const file = await open(path, 'r');
    try {
      hashes = await hashRamChunks({ fd: file.fd, address: base }, memoryDigestChunkBytes, toRead);
    } finally {
      await file.close();
    }
  }
  signal.throwIfAborted();
  toRead.forEach((index, i) => (chunks[index] = hashes[i]!));
  return { algorithm: memoryDigestAlgorithm, chunkBytes: memoryDigestChunkBytes, chunks };
}

/** Indexes of the chunks that differ (a length mismatch counts the missing chunks as different). */
export function differingChunks(a: MemoryDigest, b: MemoryDigest): number[] {
  if (a.algorithm !== b.algorithm || a.chunkBytes !== b.chunkBytes) {
    // Agents of different versions: a comparison would call every chunk different and blame QEMU.
    throw new VmferryError('VMF_MIGRATION_FAILED', `memory digests are not comparable (${a.algorithm} per ${a.chunkBytes} bytes against ${b.algorithm} per ${b.chunkBytes} bytes)`);
  }
  const differing: number[] = [];
  for (let i = 0; i < Math.max(a.chunks.length, b.chunks.length); i++) {
    if (a.chunks[i] !== b.chunks[i]) differing.push(i);
  }
  return differing;
}

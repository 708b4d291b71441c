/**
 * Buffers for READ replies, used again instead of allocated per request. A
 * fresh buffer per request costs page faults, and worse: with 1 MiB reads V8
 * ran a full mark-compact of the heap every few tens of MiB, so the server
 * spent more CPU in the GC than in moving data (docs/BENCHMARKS.md, issue 20).
 *
 * Buffers come in power-of-two sizes; a request gets a view of its exact
 * length on one. Only buffers this pool handed out, and each only once, are
 * taken back, so a caller's mistake cannot hand one buffer to two requests.
 * Free buffers are kept up to `maxFreeBytes` in all: idle memory on top of
 * the memory budget, which counts only what requests hold.
 */

const smallestBytes = 4 * 1024;
/** Larger requests are rare (QEMU's and fio's were 1–2 MiB): they get a buffer of their own, not kept. */
const largestBytes = 4 * 1024 * 1024;

function sizeClass(length: number): number {
  return length <= smallestBytes ? smallestBytes : 2 ** Math.ceil(Math.log2(length));
}

export class BufferPool {
  readonly maxFreeBytes: number;
  /** Free buffers by size. */
  readonly #free = new Map<number, ArrayBuffer[]>();
  #freeBytes = 0;
  /** Handed out and not yet given back. */
  readonly #lent = new WeakSet<ArrayBuffer>();

  constructor(maxFreeBytes: number) {
    this.maxFreeBytes = maxFreeBytes;
  }

  /** Bytes kept for later requests right now. */
  get freeBytes(): number {
    return this.#freeBytes;
  }

  /** A buffer of `length` bytes, holding whatever an earlier request left there: the caller fills all of it. */
  take(length: number): Buffer {
    if (length > largestBytes) return Buffer.allocUnsafeSlow(length);
    const size = sizeClass(length);
    const list = this.#free.get(size);
    let memory = list?.pop();
    if (memory) this.#freeBytes -= size;
    else memory = new ArrayBuffer(size);
    if (list?.length === 0) this.#free.delete(size);
    this.#lent.add(memory);
    return Buffer.from(memory, 0, length);
  }

  /** `buffer`, from take(), is no longer used by anyone; anything else (or a buffer given back twice) is ignored. */
  give(buffer: Buffer): void {
    const memory = buffer.buffer;
    if (!(memory instanceof ArrayBuffer) || !this.#lent.has(memory)) return;
    this.#lent.delete(memory);
    const size = memory.byteLength;
    if (this.#freeBytes + size > this.maxFreeBytes) this.#evictOtherThan(size, this.#freeBytes + size - this.maxFreeBytes);
    if (this.#freeBytes + size > this.maxFreeBytes) return;
    const list = this.#free.get(size);
    if (list) list.push(memory);
    else this.#free.set(size, [memory]);
    this.#freeBytes += size;
  }

  /** Drops free buffers of other sizes (a workload that changed its request size) to make room. */
  #evictOtherThan(size: number, bytes: number): void {
    let left = bytes;
    for (const [otherSize, list] of this.#free) {
      if (otherSize === size) continue;
      while (left > 0 && list.length > 0) {
        list.pop();
        this.#freeBytes -= otherSize;
        left -= otherSize;
      }
      if (list.length === 0) this.#free.delete(otherSize);
      if (left <= 0) return;
    }
  }
}

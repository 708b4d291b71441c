/**
 * One writer per RBD image. Ceph's exclusive lock does not fence: two QEMUs
 * may open one image and the lock moves to whichever writes. What does is
 * the OSD blocklist: a blocklisted client's I/O fails at once (-108) and it
 * cannot come back without opening the image again, as a new client.
 *
 * Clients are known by their address in the image's watchers (`rbd status`),
 * one per QEMU disk (each rbd node is a librados client of its own). A QEMU
 * cannot be asked for its address, so a migration's destination learns its
 * own as the watchers that appeared while it started (`RbdWriter.learn`);
 * at switch-over, after the source stopped and flushed and before the
 * destination resumes, every other watcher is blocklisted. A VM starting
 * afresh blocklists every watcher before its QEMU opens the image.
 * The Ceph user needs the `osd blocklist` command (`profile rbd` grants it).
 */
import type { Logger } from 'pino';
import type { VmSpec } from '../qemu/spec.ts';
import { blocklistClient, imageWatchers, type RbdImageRef } from './rbd.ts';

interface RbdDisk {
  id: string;
  ref: RbdImageRef;
}

/** The writable RBD disks of `spec`: read-only ones cannot write, so they need no fence. */
function writableRbdDisks(spec: VmSpec): RbdDisk[] {
  return spec.disks.flatMap((disk) => (disk.source.kind === 'rbd' && !disk.readOnly ? [{ id: disk.id, ref: disk.source }] : []));
}

function clientOf(ref: RbdImageRef): { conf: string; user: string } {
  return { conf: ref.conf, user: ref.user };
}

/** Every client that has each writable RBD disk of `spec` open now, by disk id. */
export async function rbdWatchers(spec: VmSpec): Promise<Map<string, string[]>> {
  const watchers = new Map<string, string[]>();
  for (const { id, ref } of writableRbdDisks(spec)) watchers.set(id, await imageWatchers(clientOf(ref), ref.pool, ref.image));
  return watchers;
}

/** Blocklists each address in turn; returns them, for the log. */
async function blocklist(ref: RbdImageRef, addresses: string[]): Promise<string[]> {
  for (const address of addresses) await blocklistClient(clientOf(ref), address);
  return addresses;
}

/**
 * Fences whoever has `spec`'s writable RBD images open, before a QEMU that
 * will write them starts: a VM starting on a host after its old host was lost
 * (that host's QEMU may still run). Returns the fenced addresses by disk id.
 */
export async function fenceAllWriters(spec: VmSpec, logger?: Logger): Promise<Map<string, string[]>> {
  const fenced = new Map<string, string[]>();
  for (const { id, ref } of writableRbdDisks(spec)) {
    const addresses = await blocklist(ref, await imageWatchers(clientOf(ref), ref.pool, ref.image));
    if (addresses.length > 0) {
      logger?.info({ disk: id, image: `${ref.pool}/${ref.image}`, fenced: addresses }, `fenced the earlier clients of RBD image ${ref.pool}/${ref.image}`);
      fenced.set(id, addresses);
    }
  }
  return fenced;
}

/** One QEMU's own clients of its RBD disks, and the fence that keeps everyone else off them. */
export class RbdWriter {
  readonly #disks: RbdDisk[];
  /** This QEMU's client addresses, by disk id. */
  readonly own: Map<string, string[]>;
  readonly #logger: Logger | undefined;

  private constructor(disks: RbdDisk[], own: Map<string, string[]>, logger: Logger | undefined) {
    this.#disks = disks;
    this.own = own;
    this.#logger = logger;
  }

  /**
   * The QEMU started from `spec` since `before` (rbdWatchers, taken just before
   * it started): its clients are the watchers that appeared meanwhile. Another
   * client opening the image at that moment (a planner's probe) counts as its
   * own too, so is never fenced by it: such a client only reads, and leaves.
   */
  static async learn(spec: VmSpec, before: Map<string, string[]>, logger?: Logger): Promise<RbdWriter> {
    const disks = writableRbdDisks(spec);
    const now = await rbdWatchers(spec);
    const own = new Map<string, string[]>();
    for (const { id } of disks) {
      const earlier = new Set(before.get(id) ?? []);
      own.set(id, (now.get(id) ?? []).filter((address) => !earlier.has(address)));
    }
    return new RbdWriter(disks, own, logger);
  }

  /** Blocklists every client of this QEMU's RBD images but its own: from now on only it writes them. Returns the fenced addresses by disk id. */
  async fenceOthers(): Promise<Map<string, string[]>> {
    const fenced = new Map<string, string[]>();
    for (const { id, ref } of this.#disks) {
      const own = new Set(this.own.get(id) ?? []);
      const others = (await imageWatchers(clientOf(ref), ref.pool, ref.image)).filter((address) => !own.has(address));
      if (others.length === 0) continue;
      fenced.set(id, await blocklist(ref, others));
      this.#logger?.info({ disk: id, image: `${ref.pool}/${ref.image}`, fenced: others }, `fenced the other clients of RBD image ${ref.pool}/${ref.image}`);
    }
    return fenced;
  }

  /**
   * Blocklists this QEMU's own clients: for a QEMU that was killed after it
   * may have taken the images, so the next writer need not wait for its
   * watches to time out (30 s by default) nor race a QEMU that did not die.
   */
  async fenceSelf(): Promise<void> {
    for (const { ref, id } of this.#disks) await blocklist(ref, this.own.get(id) ?? []);
  }
}

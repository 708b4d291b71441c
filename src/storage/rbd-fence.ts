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
 *
 * The switch-over fence runs while the guest is paused, so it is made ready
 * beforehand (`readyFence`): a helper process already connected to the
 * cluster (rbd-fence-helper.ts) does it on one message. Should the helper not
 * start, the fence runs the CLI as before, only slower; once it has started,
 * its failure fails the fence, and so the switch-over: the guest is never
 * resumed without it.
 */
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import type { VmSpec } from '../qemu/spec.ts';
import { RbdFenceHelper } from './rbd-fence-helper.ts';
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
  /** The fence made ready by readyFence, until fenceOthers or release ends it. */
  #helper: RbdFenceHelper | undefined;

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

  /**
   * Starts the helper that fences the others on one message (rbd-fence-helper.ts), so that
   * fenceOthers, in the guest's pause, starts no program. Should it not start (no python3-rados,
   * the cluster unreachable just now), it says so in the log, and fenceOthers uses the CLI.
   */
  async readyFence(): Promise<void> {
    if (this.#disks.length === 0 || this.#helper) return;
    try {
      this.#helper = await RbdFenceHelper.start(this.#disks.map(({ id, ref }) => ({ key: id, ref })));
      this.#logger?.debug({ pid: this.#helper.pid }, 'the RBD fence helper is connected and holds the images');
    } catch (err) {
      this.#logger?.warn({ err: describeError(err) }, 'the RBD fence helper did not start: the switch-over fences with the rbd and ceph programs, which lengthens the guest\'s pause');
    }
  }

  /** The pid of the helper readyFence started, while fenceOthers is to go through it; undefined when it uses the CLI. */
  get fenceHelperPid(): number | undefined {
    return this.#helper?.pid;
  }

  /**
   * Blocklists every client of this QEMU's RBD images but its own: from now on only it writes them.
   * Returns the fenced addresses by disk id. Ends the helper, whatever the outcome: it fences once.
   */
  async fenceOthers(): Promise<Map<string, string[]>> {
    const helper = this.#helper;
    if (!helper) return this.#fenceOthersWithCli();
    this.#helper = undefined;
    try {
      const fenced = await helper.fence(this.own);
      for (const [id, addresses] of fenced) this.#logFenced(id, addresses);
      return fenced;
    } catch (err) {
      throw new VmferryError(err instanceof VmferryError ? err.code : 'VMF_COMMAND_FAILED', `could not fence the other clients of the RBD images (${this.#imageNames()}): ${describeError(err)}`, { cause: err });
    } finally {
      helper.stop();
    }
  }

  /** Ends the helper readyFence started, unused: the switch-over is not coming. */
  release(): void {
    this.#helper?.stop();
    this.#helper = undefined;
  }

  async #fenceOthersWithCli(): Promise<Map<string, string[]>> {
    const fenced = new Map<string, string[]>();
    for (const { id, ref } of this.#disks) {
      const own = new Set(this.own.get(id) ?? []);
      const others = (await imageWatchers(clientOf(ref), ref.pool, ref.image)).filter((address) => !own.has(address));
      if (others.length === 0) continue;
      fenced.set(id, await blocklist(ref, others));
      this.#logFenced(id, others);
    }
    return fenced;
  }

  #logFenced(id: string, addresses: string[]): void {
    const ref = this.#disks.find((disk) => disk.id === id)?.ref;
    const image = ref ? `${ref.pool}/${ref.image}` : id;
    this.#logger?.info({ disk: id, image, fenced: addresses }, `fenced the other clients of RBD image ${image}`);
  }

  #imageNames(): string {
    return this.#disks.map(({ ref }) => `${ref.pool}/${ref.image}`).join(', ');
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

/**
 * Mirror targets filled through the host's page cache, then switched to the
 * disk's own cache mode before the guest runs on them.
 *
 * A disk with cache=none (vmferry's default, as Proxmox VE's and Nova's) has
 * its image opened with O_DIRECT: every piece the source's mirror writes into
 * the destination's fresh copy would wait for the disk, which made vmferry's
 * mirror phase the slowest part of its total time (docs/BENCHMARKS.md,
 * "Where the mirror's extra time goes"). So the incoming QEMU opens those
 * copies buffered; the mirror flushes its target before it reports READY,
 * which writes the copy out in one go; and when the RAM phase starts (the
 * source starts it once every mirror is READY) the nodes are reopened with
 * the disk's own cache mode (blockdev-reopen, which flushes what the mirror
 * wrote since). The guest never runs on a copy in another mode than the one
 * it asked for: the resume waits for the switch, and one that failed fails the
 * migration.
 */
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import { fileDiskNodes } from '../qemu/command-line.ts';
import type { QemuProcess } from '../qemu/process.ts';
import type { DiskSpec } from '../qemu/spec.ts';
import type { QmpEventListener } from '../qmp/events.ts';
import { raceAbort } from '../util/abort.ts';

/** Incoming migration states from which the RAM phase has begun (or the migration ended without one). */
const ramPhaseBegun = ['active', 'postcopy-active', 'completed'];
const ended = ['failed', 'cancelled'];

/**
 * Refuses, before anything is copied, a copy in a directory whose file
 * system cannot do direct I/O (ramfs, some FUSE mounts): the copy would fill
 * and then fail its switch to the disk's cache mode.
 */
export async function checkDirectIo(disk: DiskSpec, hostId: string): Promise<void> {
  if (disk.source.kind !== 'file') return;
  const path = disk.source.path;
  try {
    await (await open(path, constants.O_RDWR | constants.O_DIRECT)).close();
  } catch (err) {
    throw new VmferryError(
      'VMF_MIGRATION_FAILED',
      `disk ${disk.id} has cache ${disk.cache ?? 'none'}, which opens its image with O_DIRECT, and its copy ${path} on ${hostId} cannot be (${describeError(err)}): ` +
        'put that pool on a file system with direct I/O, or give the disk cache writeback',
      { cause: err },
    );
  }
}

export class FilledTargets {
  readonly #vm: QemuProcess;
  readonly #disks: DiskSpec[];
  readonly #logger: Logger | undefined;
  readonly #stop = new AbortController();
  /** Settles when the switch is done, failed (then with the reason) or no longer wanted. */
  readonly #switched: Promise<string | undefined>;

  /** `events` must be listening before the incoming migration can start; this closes it. */
  constructor(vm: QemuProcess, disks: DiskSpec[], events: QmpEventListener, logger?: Logger) {
    this.#vm = vm;
    this.#disks = disks;
    this.#logger = logger;
    this.#switched = this.#switchWhenRamMoves(events).then(
      () => undefined,
      (err: unknown) => describeError(err),
    );
  }

  async #switchWhenRamMoves(events: QmpEventListener): Promise<void> {
    try {
      const signal = this.#stop.signal;
      const event = await events.waitFor('MIGRATION', (e) => [...ramPhaseBegun, ...ended].includes(String(e.data.status)), { signal });
      if (ended.includes(String(event.data.status))) {
        throw new VmferryError('VMF_MIGRATION_FAILED', `the incoming migration ended as "${String(event.data.status)}" before its RAM phase began`);
      }
      const startedAt = performance.now();
      for (const disk of this.#disks) {
        await this.#vm.qmp(`opening disk ${disk.id}'s copy with cache ${disk.cache ?? 'none'}`, (qmp) =>
          qmp.client.execute('blockdev-reopen', { options: fileDiskNodes(disk) }, { signal }),
        );
      }
      this.#logger?.info({ disks: this.#disks.map((d) => d.id), ms: Math.round(performance.now() - startedAt) }, `mirror targets of ${this.#vm.spec.name} switched to their cache mode`);
    } finally {
      events.close();
    }
  }

  /**
   * Before the guest's `cont`: waits for the switch. One that failed fails
   * the migration, which rolls back: a guest run on B in another mode than
   * its spec's could not start again there with its own.
   */
  async settled(signal: AbortSignal): Promise<void> {
    const failure = await raceAbort(this.#switched, signal, `the switch of ${this.#vm.spec.name}'s mirror targets to their cache mode`);
    if (failure !== undefined) {
      throw new VmferryError('VMF_MIGRATION_FAILED', `the copies of ${this.#vm.spec.name}'s disks could not be switched to their cache mode: ${failure}`);
    }
  }

  /** The migration is rolled back: nothing more to switch. */
  abandon(): void {
    this.#stop.abort(new VmferryError('VMF_ABORTED', 'the incoming migration was rolled back'));
  }
}

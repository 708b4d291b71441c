/**
 * New librbd clients for a source whose migration is rolled back after it
 * completed. The destination fences at switch-over (rbd-fence.ts): it
 * blocklists every other client of the images, the source's QEMU among them,
 * before its own `cont`. Should that `cont` never come (its QEMU died or
 * refused it), the guest goes back to the source, whose clients the OSDs
 * refuse for good: librbd does not come back from a blocklisting, even once
 * the entry is removed (it fails every write with -108), so the guest would
 * stop at its first write to the disk.
 *
 * So before the guest continues there, each writable RBD disk gets a client
 * that is not on the blocklist: a new `rbd` node (a new cluster connection,
 * at a new address) is added, the disk's raw format node is reopened onto it
 * (command-line.ts puts one between the device and the client for this), and
 * the old client is deleted. The guest, paused since the switch-over, never
 * issued a request to the old client after it was fenced, so nothing it sees
 * failed; and the migration's completion flushed that client (librbd's
 * write-back cache too) before the fence, so it holds nothing the OSDs lack.
 * Only then is a swap safe: under a VM stopped on a fenced client's error the
 * old cache may hold acknowledged writes, and a flush retried through a new
 * client would report them durable. The guest's first write through the new
 * client takes the image's exclusive lock: librbd finds the old owner's watch
 * gone (the OSD drops a blocklisted client's watch), breaks the lock and
 * takes it.
 *
 * The fence's blocklist entries are left to expire: they name clients that
 * are closed now (an address and nonce no client uses again), and should an
 * old client's removal have failed, the entry still keeps it from writing.
 */
import type { Logger } from 'pino';
import { describeError } from '../errors.ts';
import { readBlockGraph } from '../qemu/block-graph.ts';
import type { QemuProcess } from '../qemu/process.ts';
import { rbdClientNode, rbdFormatNode } from '../qemu/command-line.ts';
import { diskFileNodeName, diskNodeName, type DiskSpec } from '../qemu/spec.ts';
import { imageWatchers, type RbdImageRef } from '../storage/rbd.ts';

/** One disk whose client was replaced: the node names before and after. */
export interface RbdClientSwap {
  diskId: string;
  from: string[];
  to: string;
}

/** The writable RBD disks, each with its image: only a client that writes is fenced. */
function writableRbdDisks(disks: DiskSpec[]): { disk: DiskSpec; ref: RbdImageRef }[] {
  return disks.flatMap((disk) => (disk.source.kind === 'rbd' && !disk.readOnly ? [{ disk, ref: disk.source }] : []));
}

/**
 * Gives each writable RBD disk of `vm` a new librbd client, the guest being
 * paused. Returns the disks it swapped. A disk it cannot swap keeps its client,
 * with a warning: the guest then runs as it would have without this, and stops
 * at its first write should that client have been fenced.
 */
export async function renewRbdClients(vm: QemuProcess, signal: AbortSignal, logger?: Logger): Promise<RbdClientSwap[]> {
  const disks = writableRbdDisks(vm.spec.disks);
  if (disks.length === 0) return [];
  // QEMU opens a new client in its main loop and waits for the monitors as long as librados lets it (minutes): asked
  // first with the rbd tool, which gives up within seconds, a cluster that does not answer leaves the clients as they are.
  try {
    await Promise.all(disks.map(({ ref }) => imageWatchers(ref, ref.pool, ref.image)));
  } catch (err) {
    logger?.warn({ err: describeError(err) }, `the Ceph cluster of VM ${vm.spec.name}'s RBD disks did not answer: they keep their clients, which the destination may have fenced`);
    return [];
  }
  const graph = await readBlockGraph(vm, signal);
  const swaps: RbdClientSwap[] = [];
  for (const { disk } of disks) {
    if (!graph.hasFileChild(diskNodeName(disk.id))) {
      // An agent before the raw node attached the device to the client itself, which cannot be replaced under it.
      logger?.warn(`RBD disk ${disk.id} of VM ${vm.spec.name} has no format node over its client (its QEMU was started by an older agent): it keeps its client, which the destination may have fenced`);
      continue;
    }
    try {
      swaps.push(await swapClient(vm, disk, graph.names, signal, logger));
    } catch (err) {
      logger?.warn({ err: describeError(err) }, `could not give RBD disk ${disk.id} of VM ${vm.spec.name} a new client: it keeps its old one, which the destination may have fenced`);
    }
  }
  if (swaps.length > 0) logger?.info({ swaps }, `gave VM ${vm.spec.name}'s RBD disks new clients before it continues`);
  return swaps;
}

async function swapClient(vm: QemuProcess, disk: DiskSpec, names: Set<string>, signal: AbortSignal, logger: Logger | undefined): Promise<RbdClientSwap> {
  // The disk's client nodes: the one in use, and any an earlier swap failed to delete. The new one takes the first free name.
  const old = Array.from({ length: names.size }, (_, generation) => diskFileNodeName(disk.id, generation)).filter((name) => names.has(name));
  let generation = 0;
  while (names.has(diskFileNodeName(disk.id, generation))) generation++;
  const next = diskFileNodeName(disk.id, generation);
  await vm.qmp(`giving RBD disk ${disk.id} a new client`, async (qmp) => {
    await qmp.blockdevAdd(rbdClientNode(disk, next), { signal });
    try {
      await qmp.client.execute('blockdev-reopen', { options: [rbdFormatNode(disk, next)] }, { signal });
    } catch (err) {
      await qmp.blockdevDel(next, { signal }).catch(() => undefined);
      throw err;
    }
  });
  for (const name of old) {
    // Unused now: one left behind holds a cluster connection, not the guest's data, and the next swap deletes it.
    await vm
      .qmp(`deleting RBD disk ${disk.id}'s old client`, (qmp) => qmp.blockdevDel(name, { signal }))
      .catch((err: unknown) => logger?.warn({ err: describeError(err) }, `could not delete the old client ${name} of RBD disk ${disk.id}`));
  }
  return { diskId: disk.id, from: old, to: next };
}

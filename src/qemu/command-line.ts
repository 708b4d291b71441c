/**
 * The QEMU command line for a VmSpec. Everything a migration matches on both
 * sides (device ids, node names, PCI slots) is derived from the spec alone, so
 * a source VM and its `-incoming` twin built from the same spec line up.
 */
import { VmferryError } from '../errors.ts';
import type { CacheMode, DiskSpec, NbdServerAddress, NicSpec, VmSpec } from './spec.ts';
import { diskBaseNodeName, diskFileNodeName, diskNodeName } from './spec.ts';
import { nbdClientTlsOptions, qemuTlsArguments } from './tls-creds.ts';

export const defaultQemuBinary = 'qemu-system-x86_64';

/** What runs the guest's vCPUs: the host's KVM, or QEMU's own translator (src/qemu/accel.ts chooses). */
export type Accelerator = 'kvm' | 'tcg';

export type StartMode =
  /** Boot and run. */
  | 'run'
  /** Create the VM paused (-S); `cont` starts it. */
  | 'paused'
  /** Wait for an incoming migration (-incoming defer -S): migrate-incoming starts it, cont resumes it. */
  | 'incoming';

export interface CommandLineOptions {
  mode: StartMode;
  qmpSocket: string;
  pidFile: string;
  accel: Accelerator;
  /** The host taps of the spec's NICs, in NIC order (src/qemu/taps.ts creates them before QEMU starts). */
  taps?: string[];
  /** The agent's TLS identity in QEMU's layout (tls-creds.ts): the VM gets its two credential objects. */
  tlsDir?: string;
  /** How long a shared disk's requests wait for the storage server (default sharedReconnectDelayS); shorter only in tests. */
  reconnectDelayS?: number;
  /** Image files opened through the page cache whatever their cache mode: mirror targets being filled (src/migration/filled-targets.ts). */
  bufferedDisks?: string[];
}

/** First PCI slot for disks; slots below stay free for other devices. */
const firstDiskSlot = 0x10;
/** First PCI slot for NICs: 0x08-0x0f, below the disks. */
const firstNicSlot = 0x08;

interface CacheFlags {
  direct: boolean;
  noFlush: boolean;
  writeCache: boolean;
}

// QEMU's -drive cache= shorthands, spelled out for -blockdev and -device.
const cacheFlags: Record<CacheMode, CacheFlags> = {
  none: { direct: true, noFlush: false, writeCache: true },
  writeback: { direct: false, noFlush: false, writeCache: true },
  writethrough: { direct: false, noFlush: false, writeCache: false },
  directsync: { direct: true, noFlush: false, writeCache: false },
  unsafe: { direct: false, noFlush: true, writeCache: true },
};

/**
 * How long a guest's I/O to a shared volume waits for the storage server to
 * come back before QEMU gives up on the request. It covers a storage server's
 * restart on a busy machine, in the spirit of iSCSI's replacement timeout;
 * the chaos campaign saw restarts near 15 s under load. A longer outage does
 * not reach the guest either: its disk stops the VM (werror/rerror=stop) and
 * the agent continues it once the server answers (src/agent/io-error-resume.ts).
 */
export const sharedReconnectDelayS = 60;
/** How long a QEMU starting up tries to reach the storage server before it gives up. */
const sharedOpenTimeoutS = 15;

/** QEMU's SocketAddress of an NBD server. */
export function qemuNbdServer(server: NbdServerAddress): Record<string, string> {
  return server.type === 'inet' ? { type: 'inet', host: server.host, port: String(server.port) } : { type: 'unix', path: server.path };
}

/** An NBD client node of the storage server, riding through its restarts; under TLS when the QEMU has credentials. */
interface NbdNodeOptions {
  readOnly: boolean;
  noFlush: boolean;
  tls: boolean;
  reconnectDelayS: number;
}

function nbdNode(nodeName: string, server: NbdServerAddress, exportName: string, { readOnly, noFlush, tls, reconnectDelayS }: NbdNodeOptions): Record<string, unknown> {
  return {
    driver: 'nbd',
    'node-name': nodeName,
    server: qemuNbdServer(server),
    export: exportName,
    // With credentials, never in plain text: a storage server without TLS is refused rather than trusted.
    ...(tls ? nbdClientTlsOptions(server) : {}),
    // A storage server restart or a short network outage is ridden through: requests wait up to
    // this many seconds for QEMU to reconnect instead of failing the guest's I/O at once.
    'reconnect-delay': reconnectDelayS,
    // The same outage when QEMU starts (a VM's start, or a migration's destination): without this
    // QEMU tries once and exits, so a storage server restarting at that moment would fail the migration.
    'open-timeout': sharedOpenTimeoutS,
    'read-only': readOnly,
    // The page cache is the storage server's business; only no-flush applies to a network node.
    cache: { 'no-flush': noFlush },
  };
}

/**
 * An RBD disk's librbd client: librbd talks to the Ceph cluster from inside
 * QEMU, no kernel block device; the key stays in the keyring the conf names.
 * Each such node is a cluster client of its own, at an address of its own.
 */
export function rbdClientNode(disk: DiskSpec, nodeName: string): Record<string, unknown> {
  const source = disk.source;
  if (source.kind !== 'rbd') throw new VmferryError('VMF_INVALID_ARGUMENT', `disk ${disk.id} is not on an RBD image`);
  const cache = cacheFlags[disk.cache ?? 'none'];
  return { driver: 'rbd', 'node-name': nodeName, pool: source.pool, image: source.image, conf: source.conf, user: source.user, 'read-only': disk.readOnly ?? false, cache: { 'no-flush': cache.noFlush } };
}

/**
 * The raw format node the device of an RBD disk is attached to, over its
 * client `clientNode`. It is there so the client can be replaced under a
 * running device (blockdev-reopen with another `file`): a client the
 * OSD blocklist fenced never writes again (src/migration/rbd-client-swap.ts).
 */
export function rbdFormatNode(disk: DiskSpec, clientNode: string): Record<string, unknown> {
  const cache = cacheFlags[disk.cache ?? 'none'];
  return { driver: 'raw', 'node-name': diskNodeName(disk.id), file: clientNode, 'read-only': disk.readOnly ?? false, cache: { 'no-flush': cache.noFlush } };
}

/**
 * Whether QEMU opens the disk's image file with O_DIRECT (cache none or
 * directsync): only then does a mirror target gain from being filled through
 * the page cache first (src/migration/filled-targets.ts).
 */
export function opensDirect(disk: DiskSpec): boolean {
  return disk.source.kind === 'file' && cacheFlags[disk.cache ?? 'none'].direct;
}

/**
 * An image file's two nodes, file and format, in the disk's cache mode or,
 * with `buffered`, through the page cache. The same options are what
 * blockdev-reopen takes to switch them (it resets every option not given).
 */
export function fileDiskNodes(disk: DiskSpec, { buffered = false } = {}): [Record<string, unknown>, Record<string, unknown>] {
  const source = disk.source;
  if (source.kind !== 'file') throw new VmferryError('VMF_INVALID_ARGUMENT', `disk ${disk.id} is not an image file`);
  const flags = cacheFlags[disk.cache ?? 'none'];
  const readOnly = disk.readOnly ?? false;
  const cache = { direct: flags.direct && !buffered, 'no-flush': flags.noFlush };
  const fileNode = { driver: 'file', 'node-name': diskFileNodeName(disk.id), filename: source.path, 'read-only': readOnly, cache, discard: 'unmap' };
  const formatNode: Record<string, unknown> = { driver: source.format, 'node-name': diskNodeName(disk.id), file: diskFileNodeName(disk.id), 'read-only': readOnly, cache, discard: 'unmap' };
  // The shared base by node, not by the file name in the overlay's header.
  if (source.backing) formatNode.backing = diskBaseNodeName(disk.id);
  return [fileNode, formatNode];
}

function blockdevArgs(disk: DiskSpec, tls: boolean, reconnectDelayS: number, buffered: boolean): string[] {
  const cache = cacheFlags[disk.cache ?? 'none'];
  const readOnly = disk.readOnly ?? false;
  const source = disk.source;
  if (source.kind === 'nbd') {
    return ['-blockdev', JSON.stringify(nbdNode(diskNodeName(disk.id), source.server, source.export, { readOnly, noFlush: cache.noFlush, tls, reconnectDelayS }))];
  }
  if (source.kind === 'rbd') {
    return ['-blockdev', JSON.stringify(rbdClientNode(disk, diskFileNodeName(disk.id))), '-blockdev', JSON.stringify(rbdFormatNode(disk, diskFileNodeName(disk.id)))];
  }
  const [fileNode, formatNode] = fileDiskNodes(disk, { buffered });
  const args = ['-blockdev', JSON.stringify(fileNode)];
  if (source.backing) {
    // Always read-only, whatever the disk.
    args.push('-blockdev', JSON.stringify(nbdNode(diskBaseNodeName(disk.id), source.backing.server, source.backing.export, { readOnly: true, noFlush: cache.noFlush, tls, reconnectDelayS })));
  }
  args.push('-blockdev', JSON.stringify(formatNode));
  return args;
}

/** The machine's root PCI bus: q35's is PCI Express, pc's (i440FX) plain PCI. */
function rootBus(machine: string): string {
  return machine.includes('q35') ? 'pcie.0' : 'pci.0';
}

function deviceArgs(disk: DiskSpec, index: number, bootDiskId: string | undefined, bus: string): string[] {
  const device: Record<string, unknown> = {
    driver: 'virtio-blk-pci',
    id: disk.id,
    drive: diskNodeName(disk.id),
    serial: disk.id,
    bus,
    addr: `0x${(firstDiskSlot + index).toString(16)}`,
    'write-cache': cacheFlags[disk.cache ?? 'none'].writeCache ? 'on' : 'off',
  };
  // A disk that reaches the storage server (or Ceph) over the network stops the VM when a request fails (the server
  // gone longer than QEMU waits) rather than hand the guest an I/O error it may answer by remounting
  // read-only or crashing; QEMU retries the request when the VM continues (libvirt's error_policy='stop').
  if (usesStorageServer(disk) || disk.source.kind === 'rbd') {
    device.werror = 'stop';
    device.rerror = 'stop';
  }
  if (disk.id === bootDiskId) device.bootindex = 1;
  return ['-device', JSON.stringify(device)];
}

/** Whether any of the disk's data lives on the storage server (a shared volume, or an overlay's shared base). */
export function usesStorageServer(disk: DiskSpec): boolean {
  return disk.source.kind === 'nbd' || (disk.source.kind === 'file' && disk.source.backing !== undefined);
}

function nicArgs(nic: NicSpec, index: number, tap: string | undefined, bus: string): string[] {
  if (tap === undefined) throw new VmferryError('VMF_NETWORK', `NIC ${nic.id} has no host tap to use`);
  // vhost=off: the in-kernel datapath needs KVM; under TCG QEMU moves the packets itself either way.
  const netdev = `tap,id=netdev-${nic.id},ifname=${tap},script=no,downscript=no,vhost=off`;
  const device = { driver: 'virtio-net-pci', id: nic.id, netdev: `netdev-${nic.id}`, mac: nic.mac, bus, addr: `0x${(firstNicSlot + index).toString(16)}` };
  return ['-netdev', netdev, '-device', JSON.stringify(device)];
}

/**
 * The id of TCG guests' RAM backend. Agents before 2026-11-30 made it a memfd
 * (memory-digest.ts still reads those); the id stays, so such a VM migrates to
 * a QEMU with the anonymous backend (the migration stream names RAM by it).
 */
export const guestRamBackendId = 'vmferry-ram';

/** The argument list for qemu-system-x86_64 (without the program name). */
export function qemuArguments(spec: VmSpec, options: CommandLineOptions): string[] {
  const machine = spec.machine ?? 'q35';
  // Ordinary private RAM: shared memory (a memfd) gets allocated page by page as pre-copy reads it to find zero pages (memory-digest.ts).
  const ramBackend = options.accel === 'tcg' ? ['-object', `memory-backend-ram,id=${guestRamBackendId},size=${spec.memoryMiB}M`] : [];
  const args = [
    '-name', `${spec.name},debug-threads=on`,
    '-machine', options.accel === 'tcg' ? `${machine},memory-backend=${guestRamBackendId}` : machine,
    ...ramBackend,
    '-accel', options.accel,
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    // enforce: QEMU refuses to start rather than quietly drop features the host lacks, so a guest always sees its whole model.
    ...(spec.cpu ? ['-cpu', `${spec.cpu},enforce`] : []),
    '-m', `${spec.memoryMiB}M`,
    '-smp', String(spec.vcpus),
    '-chardev', `socket,id=qmp,path=${options.qmpSocket},server=on,wait=off`,
    '-mon', 'chardev=qmp,mode=control',
    '-pidfile', options.pidFile,
    '-msg', 'timestamp=on',
    ...(options.tlsDir === undefined ? [] : qemuTlsArguments(options.tlsDir)),
  ];
  if (spec.boot.kind === 'kernel') {
    args.push('-kernel', spec.boot.kernel);
    if (spec.boot.initrd) args.push('-initrd', spec.boot.initrd);
    if (spec.boot.append) args.push('-append', spec.boot.append);
  }
  const bootDiskId = spec.boot.kind === 'disk' ? spec.boot.diskId : undefined;
  spec.disks.forEach((disk, index) => {
    const buffered = options.bufferedDisks?.includes(disk.id) ?? false;
    args.push(...blockdevArgs(disk, options.tlsDir !== undefined, options.reconnectDelayS ?? sharedReconnectDelayS, buffered), ...deviceArgs(disk, index, bootDiskId, rootBus(machine)));
  });
  (spec.nics ?? []).forEach((nic, index) => {
    args.push(...nicArgs(nic, index, options.taps?.[index], rootBus(machine)));
  });
  (spec.serialLogs ?? []).forEach((path, index) => {
    args.push('-chardev', `file,id=serial${index},path=${path}`, '-serial', `chardev:serial${index}`);
  });
  if (options.mode === 'paused') args.push('-S');
  // -S as well: without it the destination may run on its own while its disks are still exported.
  if (options.mode === 'incoming') args.push('-incoming', 'defer', '-S');
  return args;
}

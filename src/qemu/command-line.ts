/**
 * The QEMU command line for a VmSpec. Everything a migration matches on both
 * sides (device ids, node names, PCI slots) is derived from the spec alone, so
 * a source VM and its `-incoming` twin built from the same spec line up.
 */
import { VmferryError } from '../errors.ts';
import type { CacheMode, DiskSpec, NicSpec, VmSpec } from './spec.ts';
import { diskFileNodeName, diskNodeName } from './spec.ts';

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
  accel: 'tcg' | 'kvm';
  /** The host taps of the spec's NICs, in NIC order (src/qemu/taps.ts creates them before QEMU starts). */
  taps?: string[];
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

export const sharedReconnectDelayS = 15;

function blockdevArgs(disk: DiskSpec): string[] {
  const cache = cacheFlags[disk.cache ?? 'none'];
  const readOnly = disk.readOnly ?? false;
  const source = disk.source;
  if (source.kind === 'nbd') {
    const server =
      source.server.type === 'inet'
        ? { type: 'inet', host: source.server.host, port: String(source.server.port) }
        : { type: 'unix', path: source.server.path };
    const node = {
      driver: 'nbd',
      'node-name': diskNodeName(disk.id),
      server,
      export: source.export,
      // A storage server restart or a short network outage is ridden through: requests wait up to
      // this many seconds for QEMU to reconnect instead of failing the guest's I/O at once.
      'reconnect-delay': sharedReconnectDelayS,
      // The same outage when QEMU starts (a VM's start, or a migration's destination): without this
      // QEMU tries once and exits, so a storage server restarting at that moment would fail the migration.
      'open-timeout': sharedReconnectDelayS,
      'read-only': readOnly,
      // The page cache is the storage server's business; only no-flush applies to a network node.
      cache: { 'no-flush': cache.noFlush },
    };
    return ['-blockdev', JSON.stringify(node)];
  }
  const fileNode = {
    driver: 'file',
    'node-name': diskFileNodeName(disk.id),
    filename: source.path,
    'read-only': readOnly,
    cache: { direct: cache.direct, 'no-flush': cache.noFlush },
    discard: 'unmap',
  };
  const formatNode = {
    driver: source.format,
    'node-name': diskNodeName(disk.id),
    file: diskFileNodeName(disk.id),
    'read-only': readOnly,
    cache: { direct: cache.direct, 'no-flush': cache.noFlush },
    discard: 'unmap',
  };
  return ['-blockdev', JSON.stringify(fileNode), '-blockdev', JSON.stringify(formatNode)];
}

function deviceArgs(disk: DiskSpec, index: number, bootDiskId: string | undefined): string[] {
  const device: Record<string, unknown> = {
    driver: 'virtio-blk-pci',
    id: disk.id,
    drive: diskNodeName(disk.id),
    serial: disk.id,
    bus: 'pcie.0',
    addr: `0x${(firstDiskSlot + index).toString(16)}`,
    'write-cache': cacheFlags[disk.cache ?? 'none'].writeCache ? 'on' : 'off',
  };
  if (disk.id === bootDiskId) device.bootindex = 0;
  return ['-device', JSON.stringify(device)];
}

function nicArgs(nic: NicSpec, index: number, tap: string | undefined): string[] {
  if (tap === undefined) throw new VmferryError('VMF_NETWORK', `NIC ${nic.id} has no host tap to use`);
  // vhost=off: the in-kernel datapath needs KVM; under TCG QEMU moves the packets itself either way.
  const netdev = `tap,id=netdev-${nic.id},ifname=${tap},script=no,downscript=no,vhost=off`;
  const device = { driver: 'virtio-net-pci', id: nic.id, netdev: `netdev-${nic.id}`, mac: nic.mac, bus: 'pcie.0', addr: `0x${(firstNicSlot + index).toString(16)}` };
  return ['-netdev', netdev, '-device', JSON.stringify(device)];
}

/** The id of the guest RAM's memfd backend of TCG guests (memory-digest.ts reads it). */
export const guestRamBackendId = 'vmferry-ram';

/** The argument list for qemu-system-x86_64 (without the program name). */
export function qemuArguments(spec: VmSpec, options: CommandLineOptions): string[] {
  const machine = spec.machine ?? 'q35';
  // TCG guests keep their RAM in a memfd, so the agent can read it for the memory comparison at switch-over without QEMU's help.
  const ramBackend = options.accel === 'tcg' ? ['-object', `memory-backend-memfd,id=${guestRamBackendId},size=${spec.memoryMiB}M,share=on`] : [];
  const args = [
    '-name', `${spec.name},debug-threads=on`,
    '-machine', options.accel === 'tcg' ? `${machine},memory-backend=${guestRamBackendId}` : machine,
    ...ramBackend,
    '-accel', options.accel,
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-m', `${spec.memoryMiB}M`,
    '-smp', String(spec.vcpus),
    '-chardev', `socket,id=qmp,path=${options.qmpSocket},server=on,wait=off`,
    '-mon', 'chardev=qmp,mode=control',
    '-pidfile', options.pidFile,
    '-msg', 'timestamp=on',
  ];
  if (spec.boot.kind === 'kernel') {
    args.push('-kernel', spec.boot.kernel);
    if (spec.boot.initrd) args.push('-initrd', spec.boot.initrd);
    if (spec.boot.append) args.push('-append', spec.boot.append);
  }
  const bootDiskId = spec.boot.kind === 'disk' ? spec.boot.diskId : undefined;
  spec.disks.forEach((disk, index) => {
    args.push(...blockdevArgs(disk), ...deviceArgs(disk, index, bootDiskId));
  });
  (spec.nics ?? []).forEach((nic, index) => {
    args.push(...nicArgs(nic, index, options.taps?.[index]));
  });
  (spec.serialLogs ?? []).forEach((path, index) => {
    args.push('-chardev', `file,id=serial${index},path=${path}`, '-serial', `chardev:serial${index}`);
  });
  if (options.mode === 'paused') args.push('-S');
  // -S as well: without it the destination may run on its own while its disks are still exported.
  if (options.mode === 'incoming') args.push('-incoming', 'defer', '-S');
  return args;
}

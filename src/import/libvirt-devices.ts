/**
 * A libvirt domain's <devices>, mapped to a CreateVmRequest's disks and NICs.
 * Every other device is reported (not carried, or ignored as a harmless
 * default), never dropped without a word.
 */
import type { CreateVmRequest } from '../api/agent-types.ts';
import { bridgePattern, cacheModes, diskIdPattern, maxDisks, maxNics, type NbdServerAddress } from '../qemu/spec.ts';
import type { Findings } from './findings.ts';
import { child, describe, type XmlElement } from './xml-tree.ts';

export type RequestDisk = CreateVmRequest['disks'][number];
export type RequestNic = NonNullable<CreateVmRequest['nics']>[number];
type CacheMode = NonNullable<RequestDisk['cache']>;

/** A device that asked to be booted from (`<boot order='N'/>`), and the disk it became if it was carried. */
export interface BootEntry {
  order: number;
  element: XmlElement;
  diskId?: string;
}

export interface MappedDevices {
  disks: RequestDisk[];
  nics: RequestNic[];
  bootOrder: BootEntry[];
  /** The target dev of the domain's first hard disk, carried or not: what `<boot dev='hd'/>` boots. */
  firstHardDisk?: string;
}

const macPattern = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;
const defaultNbdPort = 10809;

const headless = 'vmferry runs VMs headless (-display none); use the serial console (its log is in the VM directory)';

/** Devices vmferry has no equivalent of, with what a user should know. */
const deviceReasons: Record<string, string> = {
  graphics: headless,
  video: headless,
  sound: 'vmferry VMs have no sound device',
  audio: 'vmferry VMs have no sound device',
  channel: 'vmferry VMs have no virtio-serial channels (the QEMU guest agent and SPICE agent lose theirs)',
  rng: 'vmferry VMs have no virtio-rng device; the guest gathers entropy itself',
  watchdog: 'vmferry VMs have no watchdog device',
  hostdev: 'a host device passed through to the guest cannot move to another host',
  redirdev: 'USB redirection needs SPICE, which vmferry does not run',
  smartcard: 'vmferry VMs have no smartcard reader',
  tpm: 'vmferry VMs have no TPM; secrets the guest sealed in it (BitLocker, LUKS bound to the TPM) will not unlock',
  filesystem: 'vmferry VMs have no shared host folders (virtiofs, 9p)',
  shmem: 'shared memory with the host or other VMs cannot move with the guest',
  hub: 'vmferry VMs have no USB devices',
  parallel: 'vmferry VMs have no parallel port',
  panic: 'vmferry VMs have no pvpanic device',
  vsock: 'vmferry VMs have no vsock device',
  iommu: 'vmferry VMs have no virtual IOMMU',
  memory: 'memory hotplug (DIMMs) is not supported: the VM gets a fixed amount of memory',
  lease: 'libvirt lock leases are libvirt\'s',
  crypto: 'vmferry VMs have no virtio-crypto device',
  nvram: 'vmferry VMs have no NVRAM device',
};

function drop(findings: Findings, element: XmlElement): void {
  // <video>, <sound>, <rng>, <watchdog> and the like say what they are in a model, attribute or child.
  const model = child(element, 'model')?.attrs.type;
  const detail = model === undefined ? undefined : `${describe(element)} (model '${model}')`;
  findings.drop(element, deviceReasons[element.name] ?? 'vmferry has no such device; the VM runs without it', detail);
}

/** A `<boot order='N'/>` inside a device, if it has one. */
function bootOrderOf(element: XmlElement): number | undefined {
  const boot = child(element, 'boot');
  const order = Number(boot?.attrs.order);
  return boot && Number.isInteger(order) && order > 0 ? order : undefined;
}

/** A libvirt <disk>: a local disk to import, a shared disk on the cluster's storage server, or a reason. */
function mapDisk(disk: XmlElement, storage: NbdServerAddress, findings: Findings): RequestDisk | undefined {
  const device = disk.attrs.device ?? 'disk';
  const type = disk.attrs.type ?? 'file';
  const target = child(disk, 'target');
  const dev = target?.attrs.dev;
  const subject = `disk ${dev ?? '(no target)'}`;
  if (device === 'cdrom' || device === 'floppy') {
    const file = child(disk, 'source')?.attrs.file;
    findings.drop(disk, `vmferry attaches no removable media${file ? `; if the guest needs ${file}, give it as a disk: --local-disk ID:import=${file}` : ''}`);
    return undefined;
  }
  if (device !== 'disk') {
    findings.drop(disk, device === 'lun' ? 'a host LUN passed through to the guest cannot move to another host' : `device '${device}' is not a disk vmferry knows`);
    return undefined;
  }
  if (dev === undefined || !diskIdPattern.test(dev)) {
    findings.drop(disk, `its target dev ${dev === undefined ? 'is missing' : `'${dev}' is not a valid disk id`}: vmferry names disks by it (1-20 of a-z, 0-9, '-', '_', starting with a letter)`);
    return undefined;
  }
  if (child(disk, 'encryption')) {
    findings.drop(disk, 'an encrypted image needs its libvirt secret, which vmferry does not have: decrypt it into a plain qcow2 (qemu-img convert --object secret,…) and import that');
    return undefined;
  }
  const source = child(disk, 'source');
  let mapped: RequestDisk;
  if (type === 'file') {
    const file = source?.attrs.file;
    if (file === undefined || !file.startsWith('/')) {
      findings.drop(disk, `it has no absolute source file to import (got ${file === undefined ? 'none' : `'${file}'`})`);
      return undefined;
    }
    const format = child(disk, 'driver')?.attrs.type;
    if (format !== undefined && format !== 'qcow2' && format !== 'raw') {
      findings.drop(disk, `vmferry imports qcow2 and raw images only; convert it (qemu-img convert -O qcow2 ${file} NEW.qcow2) and import that`, `${describe(disk)} (format '${format}')`);
      return undefined;
    }
    if (format === undefined) findings.ignore(disk, 'no <driver type>: the image\'s format is left to the import to read from the file', subject);
    mapped = { id: dev, local: { import: file, ...(format ? { format } : {}) } };
  } else if (type === 'network') {
    const shared = mapNetworkSource(disk, source, storage, findings);
    if (!shared) return undefined;
    mapped = { id: dev, shared };
  } else {
    findings.drop(disk, sourceAdvice(type, source));
    return undefined;
  }
  mapDiskDetails(disk, mapped, findings, subject);
  return mapped;
}

function sourceAdvice(type: string, source: XmlElement | undefined): string {
  if (type === 'block') {
    const dev = source?.attrs.dev ?? 'the device';
    return `a host block device is not an image vmferry can import: copy it into one (qemu-img convert -O qcow2 ${dev} FILE) and import that`;
  }
  if (type === 'volume') {
    const pool = source?.attrs.pool ?? 'POOL';
    const volume = source?.attrs.volume ?? 'VOLUME';
    return `a libvirt storage-pool volume: find its file (virsh vol-path --pool ${pool} ${volume}) and import that with --local-disk ID:import=FILE`;
  }
  return `vmferry carries file disks (imported) and NBD disks on its storage server, not disks of type '${type}'`;
}

function sameServer(a: NbdServerAddress, b: NbdServerAddress): boolean {
  if (a.type === 'unix' || b.type === 'unix') return a.type === b.type && a.type === 'unix' && b.type === 'unix' && a.path === b.path;
  return a.host === b.host && a.port === b.port;
}

function showServer(server: NbdServerAddress): string {
  return server.type === 'unix' ? `unix:${server.path}` : `${server.host}:${server.port}`;
}

/** `<disk type='network'>`: only an NBD export of the cluster's own storage server becomes a shared disk. */
function mapNetworkSource(disk: XmlElement, source: XmlElement | undefined, storage: NbdServerAddress, findings: Findings): NonNullable<RequestDisk['shared']> | undefined {
  const protocol = source?.attrs.protocol ?? '(none)';
  const exportName = source?.attrs.name;
  const shown = `${describe(disk)} (${protocol}${exportName ? ` '${exportName}'` : ''})`;
  if (source === undefined || protocol !== 'nbd') {
    findings.drop(disk, 'vmferry\'s shared disks are NBD exports of its storage server: create a volume (vmferry volume create), copy the data into it, and attach it with --shared-disk', shown);
    return undefined;
  }
  if (exportName === undefined || exportName === '') {
    findings.drop(disk, 'an NBD disk without an export name: vmferry attaches a shared disk by its volume name', shown);
    return undefined;
  }
  const host = child(source, 'host');
  const server: NbdServerAddress | undefined =
    host?.attrs.transport === 'unix'
      ? host.attrs.socket
        ? { type: 'unix', path: host.attrs.socket }
        : undefined
      : { type: 'inet', host: host?.attrs.name ?? 'localhost', port: host?.attrs.port ? Number(host.attrs.port) : defaultNbdPort };
  if (server === undefined || !sameServer(server, storage)) {
    const where = server ? showServer(server) : 'an unknown server';
    findings.drop(disk, `its export is on ${where}, not on the cluster's storage server (${showServer(storage)}): copy it into a volume there and attach that`, shown);
    return undefined;
  }
  if (source.attrs.tls === 'yes') findings.drop(source, 'vmferry talks to its storage server without TLS', `disk ${child(disk, 'target')?.attrs.dev}: ${describe(source)}`);
  return { server: storage, export: exportName };
}

/** What applies to any carried disk: read-only, cache, bus, and the settings vmferry does not take. */
function mapDiskDetails(disk: XmlElement, mapped: RequestDisk, findings: Findings, subject: string): void {
  for (const element of disk.children) {
    switch (element.name) {
      case 'readonly':
        mapped.readOnly = true;
        break;
      case 'driver':
        for (const [key, value] of Object.entries(element.attrs)) {
          const detail = `${subject}: driver ${key}='${value}'`;
          if (key === 'cache' && (cacheModes as readonly string[]).includes(value)) mapped.cache = value as CacheMode;
          // libvirt's "default" is QEMU's default, which is what the guest ran with.
          else if (key === 'cache' && value === 'default') mapped.cache = 'writeback';
          else if (key === 'cache') findings.drop(element, `cache mode '${value}' is not one vmferry knows; it uses QEMU's default, 'writeback'`, detail);
          else if (key === 'discard') findings.ignore(element, 'vmferry always passes discards to the image', detail);
          else if (key !== 'name' && key !== 'type') findings.drop(element, 'vmferry does not set this disk option; QEMU\'s default applies', detail);
        }
        break;
      case 'target': {
        const bus = element.attrs.bus;
        if (bus !== undefined && bus !== 'virtio') {
          findings.drop(element, `vmferry attaches every disk as virtio-blk: the guest needs virtio drivers (Linux has them; Windows needs virtio-win) and sees /dev/vdX rather than /dev/${element.attrs.dev}; mount by UUID or label`, `${subject}: bus '${bus}'`);
        }
        break;
      }
      case 'serial':
        findings.drop(element, `vmferry sets the disk's serial to its id ('${mapped.id}'), so /dev/disk/by-id names change`, `${subject}: serial '${element.text}'`);
        break;
      case 'shareable':
        findings.drop(element, 'vmferry gives a writable disk one writer at a time (the storage server fences the others)', subject);
        break;
      case 'backingStore':
        if (element.children.length > 0) findings.ignore(element, 'the import reads the image with its backing chain', subject);
        break;
      case 'source':
      case 'boot':
      case 'alias':
        break;
      case 'address':
        findings.ignore(element, 'vmferry places disks at PCI slots of its own', `${subject}: ${describe(element)}`);
        break;
      default:
        findings.drop(element, 'vmferry does not set this disk option', `${subject}: ${describe(element)}`);
    }
  }
  // No cache mode in the domain means QEMU's default, the one the guest ran with; vmferry's own default differs.
  mapped.cache ??= 'writeback';
}

/** `<interface type='bridge'>` becomes a NIC on that host bridge with its MAC; any other kind is reported. */
function mapInterface(iface: XmlElement, findings: Findings): RequestNic | undefined {
  const type = iface.attrs.type ?? '(none)';
  const source = child(iface, 'source');
  const mac = child(iface, 'mac')?.attrs.address;
  const subject = `interface ${mac ?? '(no MAC)'}`;
  if (type !== 'bridge') {
    const network = source?.attrs.network ? ` (libvirt network '${source.attrs.network}'${source.attrs.bridge ? ` on bridge ${source.attrs.bridge}` : ''})` : '';
    findings.drop(
      iface,
      `vmferry attaches NICs to host bridges only${type === 'hostdev' ? ', and a host device cannot move to another host' : ''}: give the guest a NIC with --nic bridge=BR${mac ? `,mac=${mac}` : ''}`,
      `${describe(iface)}${network}${mac ? ` MAC ${mac}` : ''}`,
    );
    return undefined;
  }
  const bridge = source?.attrs.bridge;
  if (bridge === undefined || !bridgePattern.test(bridge)) {
    findings.drop(iface, `its bridge ${bridge === undefined ? 'is missing' : `'${bridge}' is not a bridge name vmferry accepts (1-15 of A-Z, a-z, 0-9, '.', '-', '_')`}`, subject);
    return undefined;
  }
  if (mac !== undefined && !macPattern.test(mac)) {
    findings.drop(iface, `'${mac}' is not a MAC address`, subject);
    return undefined;
  }
  for (const element of iface.children) {
    switch (element.name) {
      case 'source':
      case 'mac':
      case 'boot':
      case 'alias':
        break;
      case 'target':
        findings.ignore(element, 'vmferry names the tap itself', `${subject}: tap ${element.attrs.dev ?? ''}`.trimEnd());
        break;
      case 'model':
        if (element.attrs.type !== 'virtio') {
          findings.drop(element, 'vmferry\'s NICs are virtio-net: the guest needs virtio drivers and sees a new kind of NIC', `${subject}: model '${element.attrs.type ?? '(none)'}'`);
        }
        break;
      case 'address':
        findings.drop(element, 'vmferry places NICs at PCI slots of its own; a guest that names interfaces by slot (enp1s0) may see another name, so match the MAC in its network configuration', `${subject}: ${describe(element)}`);
        break;
      default:
        findings.drop(element, 'vmferry\'s NICs are plain virtio-net on a tap in the bridge, without this setting', `${subject}: ${describe(element)}`);
    }
  }
  return mac === undefined ? { bridge } : { bridge, mac: mac.toLowerCase() };
}

/** Devices vmferry has its own version of: listed as ignored, with the reason. */
function ignoredDeviceNote(element: XmlElement): string | undefined {
  switch (element.name) {
    case 'emulator':
      return `vmferry runs its host's QEMU (${element.text})`;
    case 'controller':
      return 'vmferry adds the controllers its devices need';
    case 'serial':
    case 'console':
      return 'vmferry gives every VM a serial console logged to a file';
    case 'input':
      return 'vmferry VMs are headless; the PS/2 keyboard and mouse stay';
    case 'memballoon':
      return 'vmferry gives the guest all its memory; no balloon';
    case 'video':
      return element.children.some((c) => c.name === 'model' && c.attrs.type === 'none') ? 'no video device, as in vmferry' : undefined;
    default:
      return undefined;
  }
}

export function mapDevices(devices: XmlElement | undefined, storage: NbdServerAddress, findings: Findings): MappedDevices {
  const mapped: MappedDevices = { disks: [], nics: [], bootOrder: [] };
  for (const element of devices?.children ?? []) {
    const order = bootOrderOf(element);
    let diskId: string | undefined;
    if (element.name === 'disk') {
      if (mapped.firstHardDisk === undefined && (element.attrs.device ?? 'disk') === 'disk') mapped.firstHardDisk = child(element, 'target')?.attrs.dev ?? '(no target)';
      const disk = mapDisk(element, storage, findings);
      if (disk && mapped.disks.length >= maxDisks) findings.drop(element, `vmferry gives a VM at most ${maxDisks} disks`);
      else if (disk && mapped.disks.some((d) => d.id === disk.id)) findings.drop(element, `another disk already has the id '${disk.id}'`);
      else if (disk) {
        mapped.disks.push(disk);
        diskId = disk.id;
      }
    } else if (element.name === 'interface') {
      const nic = mapInterface(element, findings);
      if (nic && mapped.nics.length >= maxNics) findings.drop(element, `vmferry gives a VM at most ${maxNics} NICs`);
      else if (nic) mapped.nics.push(nic);
    } else {
      const note = ignoredDeviceNote(element);
      if (note !== undefined) findings.ignore(element, note);
      else drop(findings, element);
    }
    if (order !== undefined) mapped.bootOrder.push({ order, element, ...(diskId ? { diskId } : {}) });
  }
  return mapped;
}

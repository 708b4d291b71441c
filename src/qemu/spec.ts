/**
 * A VM as vmferry describes it: what QEMU needs to start it, and nothing about
 * where it runs. The same spec starts the VM on a source host and its
 * `-incoming` twin on a destination host, so everything that must match on both
 * sides (device ids, node names, PCI addresses) is derived from it.
 */
import { VmferryError } from '../errors.ts';
import type { NbdServerAddress } from '../nbd/address.ts';
import { namePattern, nameRule } from '../util/names.ts';

export type { NbdServerAddress };

export type CacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';

/** A shared volume a local overlay reads through: opened read-only, never written, never copied. */
export interface SharedBase {
  server: NbdServerAddress;
  export: string;
}

/** Where a disk's bytes live. */
export type DiskSource =
  /**
   * An image file on this host: local data, copied when the VM moves. With a
   * `backing`, a qcow2 overlay of a shared base: only the overlay is local,
   * and a migration copies it and re-attaches the base.
   */
  | { kind: 'file'; path: string; format: 'qcow2' | 'raw'; backing?: SharedBase }
  /** An export on a storage server every host reaches: shared data, re-attached when the VM moves. */
  | { kind: 'nbd'; server: NbdServerAddress; export: string }
  /**
   * An image on a Ceph cluster every host reaches (src/storage/rbd.ts): shared
   * data, re-attached when the VM moves. `conf` and `user` say where Ceph is
   * and who to be; the key stays in the keyring the conf names.
   */
  | { kind: 'rbd'; pool: string; image: string; conf: string; user: string };

export interface DiskSpec {
  /** Stable id: the guest sees it as the disk's serial; migration addresses the disk by it. */
  id: string;
  source: DiskSource;
  readOnly?: boolean;
  /** Host cache mode; default 'none' (O_DIRECT, flushes reach the disk). */
  cache?: CacheMode;
}

export type BootSpec =
  | { kind: 'kernel'; kernel: string; initrd?: string; append?: string }
  | { kind: 'disk'; diskId: string };

/** A virtio-net NIC on a bridge of the host the VM runs on; its tap is the agent's (src/qemu/taps.ts). */
export interface NicSpec {
  /** Stable id (net0, net1, …): the QEMU device id, so both ends of a migration match. */
  id: string;
  /** The host bridge the NIC's tap joins; every host the VM runs on needs one of this name. */
  bridge: string;
  /** The guest's MAC, chosen once at creation and kept for the VM's life (aa:bb:cc:dd:ee:ff). */
  mac: string;
}

export interface VmSpec {
  name: string;
  vcpus: number;
  memoryMiB: number;
  /** QEMU machine type; both ends of a migration must use the same one. Default 'q35'. */
  machine?: string;
  /**
   * QEMU CPU model (`-cpu MODEL,enforce`), the same on both ends of a
   * migration. Absent in VMs created before vmferry set one: QEMU's own
   * default (qemu64) then, unchanged across migrations.
   */
  cpu?: string;
  boot: BootSpec;
  disks: DiskSpec[];
  nics?: NicSpec[];
  /** Log files for the guest's serial ports, in order: the first is ttyS0 (the console). */
  serialLogs?: string[];
}

// virtio-blk serials hold 20 bytes; QMP node names must start with a letter.
export const diskIdPattern = /^[a-z][a-z0-9_-]{0,19}$/;
// A bare model name: a comma would smuggle -cpu properties (features, enforce=off) into the command line.
// Ceph pool, image and user names: Ceph allows more, but these survive QEMU's rbd: filename syntax and a shell unquoted.
export const cephNamePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;
export const cpuModelPattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const cacheModes: readonly CacheMode[] = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];
export const maxDisks = 16;
export const maxNics = 8;
const nicIdPattern = /^[a-z][a-z0-9_-]{0,14}$/;
// What the kernel takes as an interface name: 1-15 bytes, no '/', ':', ',' (QEMU's separator) or space.
export const bridgePattern = /^[A-Za-z0-9_.-]{1,15}$/;
const macPattern = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
export const maxSerialPorts = 4;

function invalid(field: string, problem: string): never {
  throw new VmferryError('VMF_INVALID_SPEC', `invalid VM spec: ${field} ${problem}`);
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function requireString(value: unknown, field: string): string {
  if (typeof value !== 'string' || value.length === 0) invalid(field, 'must be a non-empty string');
  return value;
}

function requireInteger(value: unknown, field: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    invalid(field, `must be an integer from ${min} to ${max} (got ${JSON.stringify(value)})`);
  }
  return value;
}

/** Linux's PATH_MAX: a longer path is no file QEMU could open. */
const maxPathBytes = 4096;

function requireAbsolutePath(value: unknown, field: string): string {
  const path = requireString(value, field);
  if (Buffer.byteLength(path) > maxPathBytes) invalid(field, `must be at most ${maxPathBytes} bytes`);
  if (!path.startsWith('/')) invalid(field, `must be an absolute path (got "${path}")`);
  if (path.includes(',')) invalid(field, `must not contain a comma (got "${path}")`);
  return path;
}

function validateNbdServer(value: unknown, field: string): NbdServerAddress {
  if (!isRecord(value)) invalid(field, 'must be an object');
  if (value.type === 'inet') {
    const host = requireString(value.host, `${field}.host`);
    if (host.length > 255) invalid(`${field}.host`, 'must be at most 255 characters');
    const port = requireInteger(value.port, `${field}.port`, 1, 65535);
    return { type: 'inet', host, port };
  }
  if (value.type === 'unix') return { type: 'unix', path: requireAbsolutePath(value.path, `${field}.path`) };
  return invalid(`${field}.type`, `must be "inet" or "unix" (got ${JSON.stringify(value.type)})`);
}

function validateExportName(value: unknown, field: string): string {
  const exportName = requireString(value, field);
  if (Buffer.byteLength(exportName) > 4096) invalid(field, 'must be at most 4096 bytes');
  return exportName;
}

function validateSharedBase(value: unknown, field: string): SharedBase {
  if (!isRecord(value)) invalid(field, 'must be an object');
  return { server: validateNbdServer(value.server, `${field}.server`), export: validateExportName(value.export, `${field}.export`) };
}

function validateDiskSource(value: unknown, field: string): DiskSource {
  if (!isRecord(value)) invalid(field, 'must be an object');
  if (value.kind === 'file') {
    const path = requireAbsolutePath(value.path, `${field}.path`);
    if (value.format !== 'qcow2' && value.format !== 'raw') {
      invalid(`${field}.format`, `must be "qcow2" or "raw" (got ${JSON.stringify(value.format)})`);
    }
    if (value.backing === undefined) return { kind: 'file', path, format: value.format };
    if (value.format !== 'qcow2') invalid(`${field}.backing`, 'needs format "qcow2": only a qcow2 overlay has a backing file');
    return { kind: 'file', path, format: value.format, backing: validateSharedBase(value.backing, `${field}.backing`) };
  }
  if (value.kind === 'nbd') {
    const server = validateNbdServer(value.server, `${field}.server`);
    return { kind: 'nbd', server, export: validateExportName(value.export, `${field}.export`) };
  }
  if (value.kind === 'rbd') {
    const name = (key: 'pool' | 'image' | 'user'): string => {
      const text = requireString(value[key], `${field}.${key}`);
      if (!cephNamePattern.test(text)) invalid(`${field}.${key}`, `must be 1-100 characters of A-Z, a-z, 0-9, '.', '-', '_', starting with a letter or digit (got "${text}")`);
      return text;
    };
    const conf = requireAbsolutePath(value.conf, `${field}.conf`);
    if (conf.includes(':')) invalid(`${field}.conf`, `must not contain a colon (got "${conf}")`);
    return { kind: 'rbd', pool: name('pool'), image: name('image'), conf, user: name('user') };
  }
  return invalid(`${field}.kind`, `must be "file", "nbd" or "rbd" (got ${JSON.stringify(value.kind)})`);
}

function validateDisk(value: unknown, field: string): DiskSpec {
  if (!isRecord(value)) invalid(field, 'must be an object');
  const id = requireString(value.id, `${field}.id`);
  if (!diskIdPattern.test(id)) {
    invalid(`${field}.id`, `must be 1-20 characters of a-z, 0-9, '-', '_', starting with a letter (got "${id}")`);
  }
  const source = validateDiskSource(value.source, `${field}.source`);
  if (value.readOnly !== undefined && typeof value.readOnly !== 'boolean') invalid(`${field}.readOnly`, 'must be a boolean');
  if (value.cache !== undefined && !cacheModes.includes(value.cache as CacheMode)) {
    invalid(`${field}.cache`, `must be one of ${cacheModes.join(', ')} (got ${JSON.stringify(value.cache)})`);
  }
  const disk: DiskSpec = { id, source };
  if (value.readOnly !== undefined) disk.readOnly = value.readOnly;
  if (value.cache !== undefined) disk.cache = value.cache as CacheMode;
  return disk;
}

function validateNic(value: unknown, field: string): NicSpec {
  if (!isRecord(value)) invalid(field, 'must be an object');
  const id = requireString(value.id, `${field}.id`);
  if (!nicIdPattern.test(id)) invalid(`${field}.id`, `must be 1-15 characters of a-z, 0-9, '-', '_', starting with a letter (got "${id}")`);
  const bridge = requireString(value.bridge, `${field}.bridge`);
  if (!bridgePattern.test(bridge)) invalid(`${field}.bridge`, `must be a host interface name: 1-15 characters of A-Z, a-z, 0-9, '.', '-', '_' (got "${bridge}")`);
  const mac = requireString(value.mac, `${field}.mac`);
  if (!macPattern.test(mac)) invalid(`${field}.mac`, `must be six lower-case hex pairs separated by ':' (got "${mac}")`);
  // Bit 0 of the first octet marks a group address: a NIC with one would never get its frames.
  if (parseInt(mac.slice(0, 2), 16) & 1) invalid(`${field}.mac`, `must be a unicast address (got multicast "${mac}")`);
  return { id, bridge, mac };
}

function validateNics(value: unknown): NicSpec[] {
  if (!Array.isArray(value)) invalid('nics', 'must be an array');
  if (value.length > maxNics) invalid('nics', `must have at most ${maxNics} entries`);
  const nics = value.map((nic, i) => validateNic(nic, `nics[${i}]`));
  nics.forEach((nic, i) => {
    if (nics.findIndex((n) => n.id === nic.id) !== i) invalid(`nics[${i}].id`, `repeats "${nic.id}"; NIC ids must be unique`);
    if (nics.findIndex((n) => n.mac === nic.mac) !== i) invalid(`nics[${i}].mac`, `repeats "${nic.mac}"; MACs must be unique`);
  });
  return nics;
}

function validateBoot(value: unknown, diskIds: Set<string>): BootSpec {
  if (!isRecord(value)) invalid('boot', 'must be an object');
  if (value.kind === 'kernel') {
    const boot: BootSpec = { kind: 'kernel', kernel: requireAbsolutePath(value.kernel, 'boot.kernel') };
    if (value.initrd !== undefined) boot.initrd = requireAbsolutePath(value.initrd, 'boot.initrd');
    if (value.append !== undefined) {
      if (typeof value.append !== 'string' || value.append.length > 4096) invalid('boot.append', 'must be a string of at most 4096 characters');
      boot.append = value.append;
    }
    return boot;
  }
  if (value.kind === 'disk') {
    const diskId = requireString(value.diskId, 'boot.diskId');
    if (!diskIds.has(diskId)) invalid('boot.diskId', `names no disk of this VM (got "${diskId}")`);
    return { kind: 'disk', diskId };
  }
  return invalid('boot.kind', `must be "kernel" or "disk" (got ${JSON.stringify(value.kind)})`);
}

/**
 * Checks an untrusted value (a config file, an API body) and returns it as a
 * VmSpec, or throws VMF_INVALID_SPEC naming the first field that is wrong.
 */
export function validateVmSpec(value: unknown): VmSpec {
  if (!isRecord(value)) invalid('(root)', 'must be an object');
  const name = requireString(value.name, 'name');
  if (!namePattern.test(name)) {
    invalid('name', `must be ${nameRule} (got "${name}")`);
  }
  const vcpus = requireInteger(value.vcpus, 'vcpus', 1, 64);
  const memoryMiB = requireInteger(value.memoryMiB, 'memoryMiB', 16, 1024 * 1024);
  if (value.machine !== undefined && (typeof value.machine !== 'string' || !/^[a-z0-9._-]+$/.test(value.machine))) {
    invalid('machine', `must be a QEMU machine type such as "q35" (got ${JSON.stringify(value.machine)})`);
  }
  if (value.cpu !== undefined && (typeof value.cpu !== 'string' || !cpuModelPattern.test(value.cpu))) {
    invalid('cpu', `must be a QEMU CPU model name such as "qemu64-v1" or "Westmere-v1", without features (got ${JSON.stringify(value.cpu)})`);
  }
  if (!Array.isArray(value.disks)) invalid('disks', 'must be an array');
  if (value.disks.length > maxDisks) invalid('disks', `must have at most ${maxDisks} entries`);
  const disks = value.disks.map((disk, i) => validateDisk(disk, `disks[${i}]`));
  const ids = new Set<string>();
  disks.forEach((disk, i) => {
    if (ids.has(disk.id)) invalid(`disks[${i}].id`, `repeats "${disk.id}"; disk ids must be unique`);
    ids.add(disk.id);
  });
  const boot = validateBoot(value.boot, ids);
  const spec: VmSpec = { name, vcpus, memoryMiB, boot, disks };
  if (value.machine !== undefined) spec.machine = value.machine;
  if (value.cpu !== undefined) spec.cpu = value.cpu;
  if (value.nics !== undefined) spec.nics = validateNics(value.nics);
  if (value.serialLogs !== undefined) {
    if (!Array.isArray(value.serialLogs)) invalid('serialLogs', 'must be an array of paths');
    if (value.serialLogs.length > maxSerialPorts) invalid('serialLogs', `must have at most ${maxSerialPorts} entries`);
    spec.serialLogs = value.serialLogs.map((path, i) => requireAbsolutePath(path, `serialLogs[${i}]`));
  }
  return spec;
}

/** Node name of the disk's top block node: what the device uses and what migration mirrors. */
export function diskNodeName(diskId: string): string {
  return `disk-${diskId}`;
}

/** Node name of the file protocol node under a file disk's format node. */
export function diskFileNodeName(diskId: string): string {
  return `disk-${diskId}-file`;
}

/** Node name of the read-only NBD node under an overlay: its shared base. */
export function diskBaseNodeName(diskId: string): string {
  return `disk-${diskId}-base`;
}

/** A disk is local data when it lives in a file on this host. */
export function isLocalDisk(disk: DiskSpec): boolean {
  return disk.source.kind === 'file';
}

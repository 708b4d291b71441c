/**
 * A VM as vmferry describes it: what QEMU needs to start it, and nothing about
 * where it runs. The same spec starts the VM on a source host and its
 * `-incoming` twin on a destination host, so everything that must match on both
 * sides (device ids, node names, PCI addresses) is derived from it.
 */
import { Type, type Static } from '@sinclair/typebox';
import { VmferryError } from '../errors.ts';
import { NbdServerAddressSchema, type NbdServerAddress } from '../nbd/address.ts';
import { hostPathProblem, hostPathSchema as hostPath } from '../util/host-path.ts';
import { namePatternSource, nameRule } from '../util/names.ts';
import { hostFormat, schemaProblem, schemaValue } from '../util/schema-problem.ts';

export type { NbdServerAddress };

// virtio-blk serials hold 20 bytes; QMP node names must start with a letter.
export const diskIdPattern = /^[a-z][a-z0-9_-]{0,19}$/;
// Ceph pool, image and user names: Ceph allows more, but these survive QEMU's rbd: filename syntax and a shell unquoted.
export const cephNamePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;
// A bare model name: a comma would smuggle -cpu properties (features, enforce=off) into the command line.
export const cpuModelPattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const cacheModes = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
export const maxDisks = 16;
export const maxNics = 8;
// What the kernel takes as an interface name: 1-15 bytes, no '/', ':', ',' (QEMU's separator) or space.
export const bridgePattern = /^[A-Za-z0-9_.-]{1,15}$/;
export const maxSerialPorts = 4;

/** A Ceph conf goes into QEMU's rbd: filename, where a colon starts an option. */
const cephConfPath = Type.String({
  minLength: 1,
  format: hostFormat('ceph-conf-path', (path) => hostPathProblem(path) ?? (path.includes(':') ? `must not contain a colon (got "${path}")` : undefined)),
});
/** NBD limits an export name to 4096 bytes. */
const exportName = Type.String({
  minLength: 1,
  format: hostFormat('nbd-export-name', (name) => (Buffer.byteLength(name) > 4096 ? 'must be at most 4096 bytes' : undefined)),
});

export const vmNameSchema = Type.String({ pattern: namePatternSource, description: nameRule });
export const diskIdSchema = Type.String({ pattern: diskIdPattern.source, description: "1-20 characters of a-z, 0-9, '-', '_', starting with a letter" });
export const cephNameSchema = Type.String({ pattern: cephNamePattern.source, description: "1-100 characters of A-Z, a-z, 0-9, '.', '-', '_', starting with a letter or digit" });
export const cpuModelSchema = Type.String({ pattern: cpuModelPattern.source, description: 'a QEMU CPU model name such as "qemu64-v1" or "Westmere-v1", without features' });
export const bridgeSchema = Type.String({ pattern: bridgePattern.source, description: "a host interface name: 1-15 characters of A-Z, a-z, 0-9, '.', '-', '_'" });

/** A shared volume a local overlay reads through: opened read-only, never written, never copied. */
const SharedBaseSchema = Type.Object({ server: NbdServerAddressSchema, export: exportName });
export type SharedBase = Static<typeof SharedBaseSchema>;

/** Where a disk's bytes live. */
const DiskSourceSchema = Type.Union([
  /**
   * An image file on this host: local data, copied when the VM moves. With a
   * `backing`, a qcow2 overlay of a shared base: only the overlay is local,
   * and a migration copies it and re-attaches the base.
   */
  Type.Object({ kind: Type.Literal('file'), path: hostPath, format: Type.Union([Type.Literal('qcow2'), Type.Literal('raw')]), backing: Type.Optional(SharedBaseSchema) }),
  /** An export on a storage server every host reaches: shared data, re-attached when the VM moves. */
  Type.Object({ kind: Type.Literal('nbd'), server: NbdServerAddressSchema, export: exportName }),
  /**
   * An image on a Ceph cluster every host reaches (src/storage/rbd.ts): shared
   * data, re-attached when the VM moves. `conf` and `user` say where Ceph is
   * and who to be; the key stays in the keyring the conf names.
   */
  Type.Object({ kind: Type.Literal('rbd'), pool: cephNameSchema, image: cephNameSchema, conf: cephConfPath, user: cephNameSchema }),
]);
export type DiskSource = Static<typeof DiskSourceSchema>;

const CacheModeSchema = Type.Union(
  cacheModes.map((mode) => Type.Literal(mode)),
  { description: `one of ${cacheModes.join(', ')}` },
);
export type CacheMode = (typeof cacheModes)[number];

const DiskSpecSchema = Type.Object({
  /** Stable id: the guest sees it as the disk's serial; migration addresses the disk by it. */
  id: diskIdSchema,
  source: DiskSourceSchema,
  readOnly: Type.Optional(Type.Boolean()),
  /** Host cache mode; default 'none' (O_DIRECT, flushes reach the disk). */
  cache: Type.Optional(CacheModeSchema),
});
export type DiskSpec = Static<typeof DiskSpecSchema>;

const BootSpecSchema = Type.Union([
  Type.Object({ kind: Type.Literal('kernel'), kernel: hostPath, initrd: Type.Optional(hostPath), append: Type.Optional(Type.String({ maxLength: 4096 })) }),
  /** Which disk the firmware boots; it must be one of the VM's (checked in validateVmSpec). */
  Type.Object({ kind: Type.Literal('disk'), diskId: Type.String({ minLength: 1 }) }),
]);
export type BootSpec = Static<typeof BootSpecSchema>;

/** A virtio-net NIC on a bridge of the host the VM runs on; its tap is the agent's (src/qemu/taps.ts). */
const NicSpecSchema = Type.Object({
  /** Stable id (net0, net1, …): the QEMU device id, so both ends of a migration match. */
  id: Type.String({ pattern: '^[a-z][a-z0-9_-]{0,14}$', description: "1-15 characters of a-z, 0-9, '-', '_', starting with a letter" }),
  /** The host bridge the NIC's tap joins; every host the VM runs on needs one of this name. */
  bridge: bridgeSchema,
  /** The guest's MAC, chosen once at creation and kept for the VM's life (aa:bb:cc:dd:ee:ff). */
  mac: Type.String({ pattern: '^[0-9a-f]{2}(:[0-9a-f]{2}){5}$', description: "six lower-case hex pairs separated by ':'" }),
});
export type NicSpec = Static<typeof NicSpecSchema>;

/**
 * The VM spec's one definition: what validateVmSpec checks, and (through
 * Static) the type the code uses. Fields it does not name are dropped, not
 * refused, so a spec written by another vmferry version still loads.
 */
export const VmSpecSchema = Type.Object({
  name: vmNameSchema,
  vcpus: Type.Integer({ minimum: 1, maximum: 64 }),
  memoryMiB: Type.Integer({ minimum: 16, maximum: 1024 * 1024 }),
  /** QEMU machine type; both ends of a migration must use the same one. Default 'q35'. */
  machine: Type.Optional(Type.String({ pattern: '^[a-z0-9._-]+$', description: 'a QEMU machine type such as "q35"' })),
  /**
   * QEMU CPU model (`-cpu MODEL,enforce`), the same on both ends of a
   * migration. Absent in VMs created before vmferry set one: QEMU's own
   * default (qemu64) then, unchanged across migrations.
   */
  cpu: Type.Optional(cpuModelSchema),
  boot: BootSpecSchema,
  disks: Type.Array(DiskSpecSchema, { maxItems: maxDisks }),
  nics: Type.Optional(Type.Array(NicSpecSchema, { maxItems: maxNics })),
  /** Log files for the guest's serial ports, in order: the first is ttyS0 (the console). */
  serialLogs: Type.Optional(Type.Array(hostPath, { maxItems: maxSerialPorts })),
});
export type VmSpec = Static<typeof VmSpecSchema>;

function invalid(field: string, problem: string): never {
  throw new VmferryError('VMF_INVALID_SPEC', `invalid VM spec: ${field} ${problem}`);
}

/** The rules between fields, which no schema keyword says; `spec` already fits VmSpecSchema. */
function checkAcrossFields(spec: VmSpec): void {
  spec.disks.forEach((disk, i) => {
    if (spec.disks.findIndex((d) => d.id === disk.id) !== i) invalid(`disks[${i}].id`, `repeats "${disk.id}"; disk ids must be unique`);
    if (disk.source.kind === 'file' && disk.source.backing && disk.source.format !== 'qcow2') {
      invalid(`disks[${i}].source.backing`, 'needs format "qcow2": only a qcow2 overlay has a backing file');
    }
  });
  if (spec.boot.kind === 'disk') {
    const diskId = spec.boot.diskId;
    if (!spec.disks.some((disk) => disk.id === diskId)) invalid('boot.diskId', `names no disk of this VM (got "${diskId}")`);
  }
  const nics = spec.nics ?? [];
  nics.forEach((nic, i) => {
    if (nics.findIndex((n) => n.id === nic.id) !== i) invalid(`nics[${i}].id`, `repeats "${nic.id}"; NIC ids must be unique`);
    if (nics.findIndex((n) => n.mac === nic.mac) !== i) invalid(`nics[${i}].mac`, `repeats "${nic.mac}"; MACs must be unique`);
    // Bit 0 of the first octet marks a group address: a NIC with one would never get its frames.
    if (parseInt(nic.mac.slice(0, 2), 16) & 1) invalid(`nics[${i}].mac`, `must be a unicast address (got multicast "${nic.mac}")`);
  });
}

/**
 * Checks an untrusted value (a config file, an API body, a spec.json on disk)
 * and returns it as a VmSpec, or throws VMF_INVALID_SPEC naming the first
 * field that is wrong.
 */
export function validateVmSpec(value: unknown): VmSpec {
  const problem = schemaProblem(VmSpecSchema, value);
  if (problem) invalid(problem.field, problem.problem);
  const spec = schemaValue<VmSpec>(VmSpecSchema, value);
  checkAcrossFields(spec);
  return spec;
}

/** Node name of the disk's top block node: what the device uses and what migration mirrors. */
export function diskNodeName(diskId: string): string {
  return `disk-${diskId}`;
}

/**
 * Node name of the protocol node under a disk's format node: the file of a
 * file disk, the librbd client of an RBD disk. An RBD disk's client can be
 * replaced while the VM lives (src/migration/rbd-client-swap.ts): each new one
 * takes the next `generation`, since the old one is still attached while the
 * new one is added.
 */
export function diskFileNodeName(diskId: string, generation = 0): string {
  return generation === 0 ? `disk-${diskId}-file` : `disk-${diskId}-file-${generation}`;
}

/** Node name of the read-only NBD node under an overlay: its shared base. */
export function diskBaseNodeName(diskId: string): string {
  return `disk-${diskId}-base`;
}

/** A disk is local data when it lives in a file on this host. */
export function isLocalDisk(disk: DiskSpec): boolean {
  return disk.source.kind === 'file';
}

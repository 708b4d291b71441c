/**
 * `vmferry volume … --backend rbd`: shared volumes as RBD images on a Ceph
 * cluster, managed through Ceph's own tools (src/storage/rbd.ts). Where Ceph
 * is comes from --ceph-conf/--ceph-user, or VMFERRY_CEPH_CONF/VMFERRY_CEPH_USER,
 * the same for the whole vmferry cluster.
 */
import type { Command } from 'commander';
import { VmferryError } from '../errors.ts';
import { formatBytes } from '../util/format.ts';
import { createImage, listImages, removeImage, resizeImage, type CephClient } from '../storage/rbd.ts';
import { parseSize, printJson } from './common.ts';
import { table } from './render.ts';

export interface RbdCliOptions {
  backend: string;
  pool?: string;
  cephConf: string;
  cephUser: string;
}

/** The options every `volume` command takes to reach Ceph. */
export function addRbdOptions(command: Command): Command {
  return command
    .option('--backend <nbd|rbd>', 'where the volume lives: vmferry\'s storage server (nbd) or a Ceph cluster (rbd)', 'nbd')
    .option('--pool <pool>', 'the Ceph pool (with --backend rbd)')
    .option('--ceph-conf <path>', 'the Ceph conf file; it names the monitors and the keyring (or VMFERRY_CEPH_CONF)', process.env.VMFERRY_CEPH_CONF ?? '/etc/ceph/ceph.conf')
    .option('--ceph-user <name>', 'the Ceph user, without "client." (or VMFERRY_CEPH_USER)', process.env.VMFERRY_CEPH_USER ?? 'admin');
}

/** The backend asked for; for rbd also the pool and the client, checked. */
export function backendOf(opts: RbdCliOptions): { backend: 'nbd' } | { backend: 'rbd'; pool: string; client: CephClient } {
  if (opts.backend === 'nbd') {
    if (opts.pool !== undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', '--pool is for --backend rbd; the storage server has no pools');
    return { backend: 'nbd' };
  }
  if (opts.backend !== 'rbd') throw new VmferryError('VMF_INVALID_ARGUMENT', `--backend must be "nbd" or "rbd" (got "${opts.backend}")`);
  if (opts.pool === undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', '--backend rbd needs --pool POOL: the Ceph pool the image is in');
  if (!opts.cephConf.startsWith('/')) throw new VmferryError('VMF_INVALID_ARGUMENT', `--ceph-conf must be an absolute path (got "${opts.cephConf}")`);
  return { backend: 'rbd', pool: opts.pool, client: { conf: opts.cephConf, user: opts.cephUser } };
}

function json(command: Command): boolean {
  return command.optsWithGlobals<{ json?: boolean }>().json ?? false;
}

export async function createRbdVolume(name: string, size: string, rbd: { pool: string; client: CephClient }, command: Command): Promise<void> {
  const created = await createImage(rbd.client, rbd.pool, name, parseSize(size, '--size'));
  if (json(command)) printJson({ backend: 'rbd', ...created });
  else console.log(`created RBD image ${rbd.pool}/${created.name} (${formatBytes(created.sizeBytes)})`);
}

export async function listRbdVolumes(rbd: { pool: string; client: CephClient }, command: Command): Promise<void> {
  const images = await listImages(rbd.client, rbd.pool);
  if (json(command)) printJson(images.map((image) => ({ backend: 'rbd', ...image })));
  else console.log(table(['volume', 'size', 'backend', 'clients'], images.map((i) => [`${i.pool}/${i.name}`, formatBytes(i.sizeBytes), 'rbd', i.watchers.join(' ') || '-'])));
}

export async function resizeRbdVolume(name: string, size: string, rbd: { pool: string; client: CephClient }): Promise<void> {
  const resized = await resizeImage(rbd.client, rbd.pool, name, parseSize(size, '--size'));
  console.log(`RBD image ${rbd.pool}/${resized.name} is now ${formatBytes(resized.sizeBytes)}`);
}

export async function removeRbdVolume(name: string, force: boolean, rbd: { pool: string; client: CephClient }): Promise<void> {
  await removeImage(rbd.client, rbd.pool, name, force);
  console.log(`deleted RBD image ${rbd.pool}/${name}`);
}

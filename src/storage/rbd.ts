/**
 * Shared volumes on a Ceph cluster: RBD images, managed with Ceph's own `rbd`
 * and `ceph` tools (Ceph is their catalog; vmferry keeps no copy of it).
 * Where Ceph is, is a client configuration: a conf file and a user name. The
 * user's key stays in the keyring the conf names (or Ceph's default
 * /etc/ceph/ceph.client.USER.keyring): vmferry never reads it, and no key
 * appears in a VM spec, a command line or a log.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import { cephNamePattern } from '../qemu/spec.ts';
import { runProgram } from '../util/run.ts';

/** How to reach a Ceph cluster: its conf file (monitors, keyring) and the Ceph user to be, without the `client.` prefix. */
export interface CephClient {
  conf: string;
  user: string;
}

/** A disk on an RBD image: the pool and image, and how to reach its cluster. */
export interface RbdImageRef {
  pool: string;
  image: string;
  conf: string;
  user: string;
}

export interface RbdImage {
  pool: string;
  name: string;
  sizeBytes: number;
  /** Clients with the image open (their addresses, as `ceph osd blocklist` takes them). */
  watchers: string[];
}

export function checkCephName(value: string, what: string): string {
  if (!cephNamePattern.test(value)) throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid ${what} "${value}": 1-100 characters of A-Z, a-z, 0-9, '.', '-', '_', starting with a letter or digit`);
  return value;
}

function clientArgs(client: CephClient): string[] {
  return ['--conf', client.conf, '--id', client.user];
}

/** Runs a Ceph tool with the client's identity; bounded, so a cluster that does not answer fails the call instead of hanging it. */
function ceph(program: 'rbd' | 'ceph', client: CephClient, args: string[]): Promise<string> {
  return runProgram(program, [...clientArgs(client), '--client-mount-timeout', '15', ...args], { timeoutMs: 30_000 });
}

function imageSpec(pool: string, image: string): string {
  return `${checkCephName(pool, 'pool')}/${checkCephName(image, 'image')}`;
}

/** The same image as QEMU opens it (command-line.ts), for qemu-img and qemu-io. */
export function qemuImageJson(ref: RbdImageRef): string {
  return `json:${JSON.stringify({ driver: 'rbd', pool: ref.pool, image: ref.image, conf: ref.conf, user: ref.user })}`;
}

function checkSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 512 || sizeBytes % 512 !== 0) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid size ${sizeBytes}: a multiple of 512 bytes, at least 512 B`);
  }
}

export async function createImage(client: CephClient, pool: string, image: string, sizeBytes: number): Promise<RbdImage> {
  checkSize(sizeBytes);
  await ceph('rbd', client, ['create', '--size', `${sizeBytes}B`, imageSpec(pool, image)]);
  return { pool, name: image, sizeBytes, watchers: [] };
}

export async function imageWatchers(client: CephClient, pool: string, image: string): Promise<string[]> {
  const status = JSON.parse(await ceph('rbd', client, ['status', '--format', 'json', imageSpec(pool, image)])) as { watchers?: { address: string }[] };
  return (status.watchers ?? []).map((w) => w.address);
}

export async function listImages(client: CephClient, pool: string): Promise<RbdImage[]> {
  const listed = JSON.parse(await ceph('rbd', client, ['ls', '--long', '--format', 'json', checkCephName(pool, 'pool')])) as { image?: string; snapshot?: string; size: number }[];
  const images: RbdImage[] = [];
  for (const entry of listed) {
    if (entry.image === undefined || entry.snapshot !== undefined) continue;
    images.push({ pool, name: entry.image, sizeBytes: entry.size, watchers: await imageWatchers(client, pool, entry.image) });
  }
  return images;
}

/** Grows an image; shrinking would cut off data a guest wrote, so it is refused. */
export async function resizeImage(client: CephClient, pool: string, image: string, sizeBytes: number): Promise<RbdImage> {
  checkSize(sizeBytes);
  const info = JSON.parse(await ceph('rbd', client, ['info', '--format', 'json', imageSpec(pool, image)])) as { size: number };
  if (sizeBytes < info.size) throw new VmferryError('VMF_INVALID_ARGUMENT', `refusing to shrink ${pool}/${image} from ${info.size} to ${sizeBytes} bytes: that would cut off data`);
  await ceph('rbd', client, ['resize', '--size', `${sizeBytes}B`, imageSpec(pool, image)]);
  return { pool, name: image, sizeBytes, watchers: await imageWatchers(client, pool, image) };
}

/**
 * Removes an image; refused while a client has it open, unless forced: then
 * its clients are blocklisted first (their I/O fails from then on), which
 * also clears the watch a killed client leaves behind for 30 s.
 */
export async function removeImage(client: CephClient, pool: string, image: string, force = false): Promise<void> {
  const watchers = await imageWatchers(client, pool, image);
  if (watchers.length > 0 && !force) {
    throw new VmferryError('VMF_CONFLICT', `RBD image ${pool}/${image} is open by ${watchers.length} client(s) (${watchers.join(', ')}); stop its VM first, or --force`);
  }
  for (const address of watchers) await blocklistClient(client, address);
  // The OSD drops a blocklisted client's watch once it has the new map: moments later.
  for (let attempt = 1; ; attempt++) {
    try {
      await ceph('rbd', client, ['rm', '--no-progress', imageSpec(pool, image)]);
      return;
    } catch (err) {
      if (watchers.length === 0 || attempt >= 20 || !/has watchers/.test((err as Error).message)) throw err;
      await sleep(250);
    }
  }
}

/** A Ceph client address as `rbd status` prints it and `ceph osd blocklist` takes it: IP:PORT/NONCE. */
const clientAddressPattern = /^[0-9a-fA-F.:[\]]+:\d+\/\d+$/;

/**
 * Cuts a client off the cluster: the OSDs refuse its I/O from now on (it
 * fails at once, -108), and it cannot come back without opening the image
 * again, as a new client at a new address.
 */
export async function blocklistClient(client: CephClient, address: string): Promise<void> {
  if (!clientAddressPattern.test(address)) throw new VmferryError('VMF_INVALID_ARGUMENT', `not a Ceph client address: "${address}"`);
  await ceph('ceph', client, ['osd', 'blocklist', 'add', address]);
}

/** Lets a blocklisted address back in; for a client that is gone, so its entry only clutters the map. */
export async function unblocklistClient(client: CephClient, address: string): Promise<void> {
  if (!clientAddressPattern.test(address)) throw new VmferryError('VMF_INVALID_ARGUMENT', `not a Ceph client address: "${address}"`);
  await ceph('ceph', client, ['osd', 'blocklist', 'rm', address]);
}

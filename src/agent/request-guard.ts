/**
 * What an agent lets a request make it touch on its host. Only the controller
 * may call an agent (docs/SECURITY.md), but the agent does not take even the
 * controller's word for its host's files and for where a guest's data goes: a
 * stolen controller certificate, an agent started with --insecure, or a bug must
 * not turn into "load /etc/shadow into a guest", "open /dev/sda as a disk" or
 * "mirror this VM's disks to my laptop".
 *
 * - Host files a request names (kernel, initrd, images to import, and every file
 *   in an import's backing chain) lie in a directory the operator trusted
 *   (`--trusted-dir`), after symlinks and `..` are resolved.
 * - A local disk's image lies in the host's pool.
 * - A shared disk, or the base of an overlay, is on the agent's storage server.
 * - A VM's serial logs lie in its own directory.
 * - A migration's source sends disks and RAM only to the destination address
 *   of its plan (checkTargets, below).
 *
 * The checks resolve paths when the request comes: whoever can write into a
 * trusted directory can still swap a file there afterwards, so those
 * directories must be writable only by the operator.
 */
import { realpath, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, sep } from 'node:path';
import { VmferryError } from '../errors.ts';
import type { BootSpec, NbdServerAddress, VmSpec } from '../qemu/spec.ts';
import { runProgram } from '../util/run.ts';

export interface RequestGuardOptions {
  /** Directories whose files a request may name (--trusted-dir); none: no request may name a host file. */
  trustedDirs: readonly string[];
  /** The host's pool: the only place a local disk's image may be. */
  poolDir: string;
  /** Where VM directories live (DATA/vms): a VM's serial logs go in its own. */
  vmsDir: string;
  /** The storage server's NBD address (--storage-nbd): the only server a shared disk may be on. */
  storageNbd: NbdServerAddress | undefined;
}

function forbidden(message: string): VmferryError {
  return new VmferryError('VMF_FORBIDDEN', message);
}

/** `path` without symlinks or `..`; for a path that does not exist (yet), its deepest existing ancestor is resolved instead. */
async function resolvePath(path: string): Promise<string> {
  try {
    return await realpath(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if ((code !== 'ENOENT' && code !== 'ENOTDIR') || dirname(path) === path) throw err;
    return join(await resolvePath(dirname(path)), basename(path));
  }
}

/** Whether `path` is `dir` or lies below it (both resolved). */
function isWithin(path: string, dir: string): boolean {
  const rel = relative(dir, path);
  return rel !== '..' && !rel.startsWith(`..${sep}`) && !isAbsolute(rel);
}

export function describeServer(server: NbdServerAddress): string {
  return server.type === 'inet' ? `${server.host}:${server.port}` : `unix socket ${server.path}`;
}

function sameServer(a: NbdServerAddress, b: NbdServerAddress): boolean {
  if (a.type === 'inet' && b.type === 'inet') return a.host === b.host && a.port === b.port;
  if (a.type === 'unix' && b.type === 'unix') return a.path === b.path;
  return false;
}

export class RequestGuard {
  readonly #trustedDirs: readonly string[];
  readonly #options: RequestGuardOptions;

  private constructor(options: RequestGuardOptions, trustedDirs: readonly string[]) {
    this.#options = options;
    this.#trustedDirs = trustedDirs;
  }

  /** Resolves the trusted directories once: one that does not exist is the operator's mistake, said at start. */
  static async create(options: RequestGuardOptions): Promise<RequestGuard> {
    const trustedDirs: string[] = [];
    for (const dir of options.trustedDirs) {
      const resolved = await realpath(dir).catch((err: unknown) => {
        throw new VmferryError('VMF_INVALID_ARGUMENT', `--trusted-dir ${dir}: ${(err as Error).message}`);
      });
      if (!(await stat(resolved)).isDirectory()) throw new VmferryError('VMF_INVALID_ARGUMENT', `--trusted-dir ${dir} is not a directory`);
      trustedDirs.push(resolved);
    }
    return new RequestGuard(options, trustedDirs);
  }

  /** A host file a request names (a kernel, an initrd, an image to import): inside a trusted directory. */
  async hostFile(path: string, field: string): Promise<void> {
    if (this.#trustedDirs.length === 0) {
      throw forbidden(
        `${field} names the host file ${path}, and this agent trusts no directory for host files: ` +
          'start it with --trusted-dir DIR (repeatable) for the directories of the kernels, initrds and images requests may use',
      );
    }
    const resolved = await resolvePath(path);
    if (this.#trustedDirs.some((dir) => isWithin(resolved, dir))) return;
    throw forbidden(
      `${field} ${path}${resolved === path ? '' : ` (which resolves to ${resolved})`} is outside the agent's trusted directories ` +
        `(${this.#trustedDirs.join(', ')}); an operator allows a directory with --trusted-dir`,
    );
  }

  /**
   * An image file to import: itself, and every file qemu-img would read with
   * it (its backing chain, a qcow2's external data file), in a trusted
   * directory; a chain that reaches beyond files (NBD, json:) is refused.
   * What is not a file or a block device (missing, a directory) is left to the import to report.
   */
  async importFile(path: string, field: string): Promise<void> {
    await this.hostFile(path, field);
    const stats = await stat(path).catch(() => undefined);
    if (!stats?.isFile() && !stats?.isBlockDevice()) return;
    let chain: { filename: string; 'format-specific'?: { data?: { 'data-file'?: string } } }[];
    try {
      chain = JSON.parse(await runProgram('qemu-img', ['info', '--backing-chain', '--output=json', '-U', path])) as typeof chain;
    } catch (err) {
      throw new VmferryError('VMF_IMAGE_INVALID', `cannot import ${path}: qemu-img cannot read it with its backing chain (${err instanceof Error ? err.message : String(err)})`, { cause: err });
    }
    for (const [depth, image] of chain.entries()) {
      const files = [image.filename, image['format-specific']?.data?.['data-file']].filter((f): f is string => f !== undefined);
      for (const file of files) {
        const what = depth === 0 ? `the data file of ${field}` : `${field}'s backing file`;
        if (!file.startsWith('/')) throw forbidden(`${what} ${file} is not a host file: an imported image may read only files in trusted directories`);
        if (file !== path) await this.hostFile(file, what);
      }
    }
  }

  /** A local disk's image: in this host's pool, whatever the request said. */
  async poolFile(path: string, field: string): Promise<void> {
    const pool = await resolvePath(this.#options.poolDir);
    const resolved = await resolvePath(path);
    if (!isWithin(resolved, pool)) throw forbidden(`${field} ${path} is not in this host's pool (${this.#options.poolDir}): an agent opens local disk images only there`);
  }

  /** A shared disk's server, or an overlay's base's: the agent's storage server. */
  storageServer(server: NbdServerAddress, field: string): void {
    const storage = this.#options.storageNbd;
    if (!storage) {
      throw forbidden(`${field} is on the NBD server ${describeServer(server)}, and this agent has no storage server: start it with --storage-nbd HOST:PORT (or --storage)`);
    }
    if (!sameServer(server, storage)) throw forbidden(`${field} is on the NBD server ${describeServer(server)}, not on this agent's storage server ${describeServer(storage)} (--storage-nbd)`);
  }

  async boot(boot: BootSpec): Promise<void> {
    if (boot.kind !== 'kernel') return;
    await this.hostFile(boot.kernel, 'boot.kernel');
    if (boot.initrd !== undefined) await this.hostFile(boot.initrd, 'boot.initrd');
  }

  /** The shared volumes `spec` names (shared disks, overlays' bases): all on the storage server. */
  sharedServers(spec: VmSpec): void {
    for (const disk of spec.disks) {
      if (disk.source.kind === 'nbd') this.storageServer(disk.source.server, `disk ${disk.id}`);
      else if (disk.source.kind === 'file' && disk.source.backing) this.storageServer(disk.source.backing.server, `the base of disk ${disk.id}`);
    }
  }

  /** Everything of `spec` QEMU opens on this host: checked before it starts. */
  async spec(spec: VmSpec): Promise<void> {
    await this.boot(spec.boot);
    this.sharedServers(spec);
    for (const disk of spec.disks) {
      if (disk.source.kind === 'file') await this.poolFile(disk.source.path, `disk ${disk.id}`);
      // QEMU reads the Ceph conf it names (and the keyring that conf names): a host file like a kernel.
      if (disk.source.kind === 'rbd') await this.hostFile(disk.source.conf, `disk ${disk.id}'s Ceph conf`);
    }
    const vmDir = await resolvePath(join(this.#options.vmsDir, spec.name));
    for (const [i, log] of (spec.serialLogs ?? []).entries()) {
      if (!isWithin(await resolvePath(log), vmDir)) throw forbidden(`serial log ${i} ${log} is not in the directory of VM ${spec.name}`);
    }
  }

  /**
   * The spec a migration brings to its destination. Its files are the
   * source's: every local disk must be one the plan mirrors, whose image the
   * destination then creates in its own pool; a file it was told to open
   * as it is (`/dev/sda`, another VM's image) is refused.
   */
  async incoming(spec: VmSpec, plan: { disks: readonly { id: string; operation: string }[] }): Promise<void> {
    await this.boot(spec.boot);
    this.sharedServers(spec);
    for (const disk of spec.disks) {
      if (disk.source.kind !== 'file') continue;
      if (plan.disks.find((d) => d.id === disk.id)?.operation !== 'mirror') {
        throw forbidden(`disk ${disk.id} is the file ${disk.source.path} and its plan does not mirror it: a destination opens only the images it creates in its pool`);
      }
    }
  }
}

/**
 * Where a migration's source may send a VM's disks (mirror targets) and RAM
 * (the migration URI): only to `address`, the destination host's address in
 * the plan the source was begun with. What the destination's prepare
 * returned reaches the source through the controller; neither may redirect it.
 */
export function checkTargets(address: string, targets: { mirrors?: readonly { diskId: string; server: NbdServerAddress }[]; uri?: string }): void {
  for (const target of targets.mirrors ?? []) {
    const where = describeServer(target.server);
    if (target.server.type !== 'inet' || target.server.host !== address) {
      throw forbidden(`the mirror of disk ${target.diskId} would go to ${where}, not to the migration's destination ${address}: a source sends a VM's disks only to the destination of its plan`);
    }
  }
  if (targets.uri !== undefined) {
    const match = /^tcp:(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(targets.uri);
    const host = match?.[1] ?? match?.[2];
    if (host !== address) {
      throw forbidden(`the migration stream would go to ${targets.uri}, not to the migration's destination ${address}: a source sends a VM's RAM only to tcp:DESTINATION:PORT of its plan`);
    }
  }
}

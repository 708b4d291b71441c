/**
 * A user's disk images brought into a host's pool: an image file imported
 * (converted into the pool; the file itself is only read), or a qcow2 overlay
 * whose backing file is a shared volume on the storage server, read-only (the
 * cloud layout: a golden image shared by every host, a small local overlay
 * per VM). Whatever fails leaves nothing in the pool.
 */
import { stat } from 'node:fs/promises';
import { VmferryError } from '../errors.ts';
import { qemuNbdServer } from '../qemu/command-line.ts';
import type { NbdServerAddress, SharedBase } from '../qemu/spec.ts';
import { nbdClientTlsOptions, qemuClientTlsObject } from '../qemu/tls-creds.ts';
import { removeDurable } from '../util/durable-file.ts';
import { runProgram } from '../util/run.ts';
import type { LocalPool } from './local-pool.ts';

/** Long enough for a large image over a slow disk; the HTTP requests that import wait as long. */
export const importTimeoutMs = 60 * 60_000;

const sectorBytes = 512;

/** The URI qemu-img uses for an export of an NBD server. */
export function nbdUri(server: NbdServerAddress, exportName: string): string {
  return server.type === 'inet'
    ? `nbd://${server.host}:${server.port}/${encodeURIComponent(exportName)}`
    : `nbd+unix:///${encodeURIComponent(exportName)}?socket=${server.path}`;
}

/**
 * How qemu-img opens an export of the storage server: its URI, or with the
 * host's QEMU credentials (tls-creds.ts) a json: node over TLS and the object it names.
 */
export function nbdImageArgs(server: NbdServerAddress, exportName: string, tlsDir: string | undefined): string[] {
  if (tlsDir === undefined) return [nbdUri(server, exportName)];
  const node = { driver: 'nbd', server: qemuNbdServer(server), export: exportName, ...nbdClientTlsOptions(server) };
  // As "file", not at the top: qemu-img then probes the format on it, as it does on a URI.
  return ['--object', qemuClientTlsObject(tlsDir), `json:${JSON.stringify({ file: node })}`];
}

interface QemuImgInfo {
  format: string;
  'virtual-size': number;
  'backing-filename'?: string;
}

function invalidImage(message: string, cause?: unknown): VmferryError {
  return new VmferryError('VMF_IMAGE_INVALID', message, cause === undefined ? undefined : { cause });
}

/**
 * What an image file to import holds, checked before anything is written:
 * qcow2 or raw. qemu-img takes any file it recognizes no format in for raw,
 * so a "raw" file must also look like a disk: a whole number of sectors.
 */
export async function inspectImportable(file: string): Promise<{ format: 'qcow2' | 'raw'; virtualSize: number }> {
  const stats = await stat(file).catch((err: NodeJS.ErrnoException) => {
    throw invalidImage(err.code === 'ENOENT' ? `cannot import ${file}: no such file` : `cannot import ${file}: ${err.message}`, err);
  });
  if (!stats.isFile() && !stats.isBlockDevice()) throw invalidImage(`cannot import ${file}: not a regular file or block device`);
  let info: QemuImgInfo;
  try {
    // No -U: an image a running VM writes is refused (qemu-img cannot take its lock) rather than copied torn.
    info = JSON.parse(await runProgram('qemu-img', ['info', '--output=json', file])) as QemuImgInfo;
  } catch (err) {
    throw invalidImage(`cannot import ${file}: qemu-img cannot read it (${err instanceof Error ? err.message : String(err)})`, err);
  }
  if (info.format !== 'qcow2' && info.format !== 'raw') {
    throw invalidImage(`cannot import ${file}: it is a ${info.format} image; only qcow2 and raw are imported (convert it first: qemu-img convert -O qcow2)`);
  }
  // The file's own size: qemu-img rounds a raw image's up to whole sectors.
  if (info.format === 'raw' && stats.isFile() && (stats.size === 0 || stats.size % sectorBytes !== 0)) {
    throw invalidImage(`cannot import ${file}: not a disk image (no qcow2 header, and ${stats.size} bytes is not a whole number of ${sectorBytes}-byte sectors)`);
  }
  return { format: info.format, virtualSize: info['virtual-size'] };
}

/**
 * Converts `file` into a new image `name` of the pool (a qcow2 with a backing
 * chain is flattened) and returns its path. The file is opened read-only; a
 * conversion that fails leaves no image behind.
 */
export async function importImage(pool: LocalPool, name: string, file: string, format: 'qcow2' | 'raw'): Promise<string> {
  const source = await inspectImportable(file);
  const path = pool.pathOf(name);
  if (await pool.exists(name)) throw new VmferryError('VMF_VOLUME_EXISTS', `volume ${name} already exists in pool ${pool.dir}`);
  try {
    // -t writeback: qemu-img convert's default for its output is "unsafe", which never flushes.
    await runProgram('qemu-img', ['convert', '-q', '-t', 'writeback', '-f', source.format, '-O', format, file, path], { timeoutMs: importTimeoutMs });
  } catch (err) {
    await removeDurable(path);
    throw err;
  }
  return path;
}

/**
 * Checks that a shared base exists and holds a raw disk (the storage server
 * exports bytes; a qcow2 copied onto a volume would be read as raw), and
 * returns its size. Connects the way QEMU will (under TLS with `tlsDir`), read-only.
 */
export async function inspectSharedBase(base: SharedBase, tlsDir?: string): Promise<{ virtualSize: number }> {
  const uri = nbdUri(base.server, base.export);
  const image = nbdImageArgs(base.server, base.export, tlsDir);
  let info: QemuImgInfo;
  try {
    info = JSON.parse(await runProgram('qemu-img', ['info', '--output=json', ...image], { timeoutMs: 20_000 })) as QemuImgInfo;
  } catch (err) {
    if (err instanceof VmferryError && err.code === 'VMF_TOOL_MISSING') throw err;
    throw invalidImage(`base volume ${base.export} cannot be opened at ${uri} (no such volume, or the storage server is unreachable): ${err instanceof Error ? err.message : String(err)}`, err);
  }
  if (info.format !== 'raw') {
    throw invalidImage(`base volume ${base.export} holds a ${info.format} image; a base must hold the disk itself (write it with qemu-img convert -O raw IMAGE ${uri})`);
  }
  return { virtualSize: info['virtual-size'] };
}

/**
 * Creates a qcow2 overlay `name` in the pool on the shared base and returns
 * its path. `sizeBytes` (default: the base's size) may grow the disk, never
 * shrink it. With `probe` false the base is taken as checked already (a
 * migration's planner did): nothing connects to it here. `tlsDir`: the
 * host's QEMU credentials, to probe under TLS.
 */
export async function createOverlay(pool: LocalPool, name: string, base: SharedBase, options: { sizeBytes?: number; probe: boolean; tlsDir?: string }): Promise<string> {
  let sizeBytes = options.sizeBytes;
  if (options.probe) {
    const { virtualSize } = await inspectSharedBase(base, options.tlsDir);
    if (sizeBytes !== undefined && sizeBytes < virtualSize) {
      throw invalidImage(`an overlay of ${sizeBytes} bytes cannot hold base volume ${base.export} of ${virtualSize} bytes; give at least its size, or none`);
    }
    sizeBytes ??= virtualSize;
  }
  if (sizeBytes === undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', `overlay ${name}: the size of base volume ${base.export} is not known`);
  const path = pool.pathOf(name);
  if (await pool.exists(name)) throw new VmferryError('VMF_VOLUME_EXISTS', `volume ${name} already exists in pool ${pool.dir}`);
  try {
    // -u: the header only names the base (for qemu-img and people); QEMU gets the base as a node of its own (command-line.ts).
    await runProgram('qemu-img', ['create', '-q', '-u', '-f', 'qcow2', '-b', nbdUri(base.server, base.export), '-F', 'raw', path, String(sizeBytes)]);
  } catch (err) {
    await removeDurable(path);
    throw err;
  }
  return path;
}

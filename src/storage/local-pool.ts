/**
 * A host's local pool: a directory of image files, managed with qemu-img.
 * Local disks live here, and mirror targets are created here on a destination.
 */
import { statfs, access } from 'node:fs/promises';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';
import { removeDurable } from '../util/durable-file.ts';
import { runProgram } from '../util/run.ts';

export interface ImageInfo {
  virtualSize: number;
  /** Bytes of guest data: the sum of the extents that hold data (what a mirror sends). */
  allocatedBytes: number;
  format: string;
  /** The image's backing file, when it is an overlay. */
  backingFile: string | undefined;
}

interface QemuImgMapExtent {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

const volumeNamePattern = /^[a-z0-9][a-z0-9._-]{0,127}$/;

/**
 * Reads size and allocation of an image, also while a QEMU has it open (-U).
 * `ownDataOnly` counts an overlay's own data and leaves its backing file
 * closed: what a mirror of the overlay alone sends.
 */
export async function imageInfo(path: string, format: string, options: { ownDataOnly?: boolean } = {}): Promise<ImageInfo> {
  const image = options.ownDataOnly ? [`json:${JSON.stringify({ driver: format, backing: null, file: { driver: 'file', filename: path } })}`] : ['-f', format, path];
  // Both at once: each is a program's start, and the probe before every migration waits for them.
  const [infoJson, mapJson] = await Promise.all([runProgram('qemu-img', ['info', '-U', '--output=json', '-f', format, path]), runProgram('qemu-img', ['map', '-U', '--output=json', ...image])]);
  const info = JSON.parse(infoJson) as { 'virtual-size': number; format: string; 'backing-filename'?: string };
  const extents = JSON.parse(mapJson) as QemuImgMapExtent[];
  const allocatedBytes = extents.filter((e) => e.data && !e.zero).reduce((sum, e) => sum + e.length, 0);
  return { virtualSize: info['virtual-size'], allocatedBytes, format: info.format, backingFile: info['backing-filename'] };
}

export class LocalPool {
  readonly dir: string;

  constructor(dir: string) {
    this.dir = dir;
  }

  pathOf(name: string): string {
    if (!volumeNamePattern.test(name)) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid volume name "${name}": use a-z, 0-9, '.', '-', '_' (at most 128)`);
    }
    return join(this.dir, name);
  }

  async exists(name: string): Promise<boolean> {
    return access(this.pathOf(name)).then(
      () => true,
      () => false,
    );
  }

  /** Creates an empty (sparse) image; refuses to overwrite one that exists. */
  async create(name: string, format: 'qcow2' | 'raw', sizeBytes: number): Promise<string> {
    const path = this.pathOf(name);
    if (await this.exists(name)) throw new VmferryError('VMF_VOLUME_EXISTS', `volume ${name} already exists in pool ${this.dir}`);
    await runProgram('qemu-img', ['create', '-q', '-f', format, path, String(sizeBytes)]);
    return path;
  }

  /** Durable: an image deleted here does not come back after a power loss. */
  async remove(name: string): Promise<void> {
    await removeDurable(this.pathOf(name));
  }

  async freeBytes(): Promise<number> {
    const stats = await statfs(this.dir);
    return stats.bavail * stats.bsize;
  }
}

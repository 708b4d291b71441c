/**
 * Where the storage server puts volume files it cannot account for (no
 * catalog row: a creation a crash interrupted, or a catalog restored from an
 * older copy): DATA/quarantine. Nothing there is deleted but by an operator
 * (`vmferry volume quarantine purge`); `restore` makes a file a volume again.
 * Each file is kept as NAME.raw, NAME being a valid volume name.
 */
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';
import { fsyncDir } from '../util/durable-file.ts';
import { namePattern } from '../util/names.ts';

export interface QuarantinedFile {
  /** What restore and purge take; the volume name a restore gives it. */
  name: string;
  sizeBytes: number;
  /** When it was moved here (the file's change time). */
  quarantinedAt: number;
}

export class Quarantine {
  readonly dir: string;

  constructor(dir: string) {
    this.dir = dir;
  }

  async list(): Promise<QuarantinedFile[]> {
    const files = (await readdir(this.dir).catch(() => [] as string[])).filter((file) => file.endsWith('.raw')).sort();
    return Promise.all(
      files.map(async (file) => {
        const stats = await stat(join(this.dir, file));
        return { name: file.slice(0, -'.raw'.length), sizeBytes: stats.size, quarantinedAt: Math.round(stats.ctimeMs) };
      }),
    );
  }

  /** Moves `path` (named `fileName` in its directory) here; returns its name in quarantine. The move is durable before this resolves. */
  async admit(path: string, fileName: string): Promise<string> {
    await mkdir(this.dir, { recursive: true });
    const base = fileName.endsWith('.raw') ? fileName.slice(0, -'.raw'.length) : fileName;
    const stem = namePattern.test(base) ? base : 'orphan';
    const taken = new Set(await readdir(this.dir));
    let name = stem;
    for (let n = 2; taken.has(`${name}.raw`); n++) name = `${stem.slice(0, 62 - String(n).length)}.${n}`;
    await rename(path, this.path(name));
    await fsyncDir(this.dir);
    return name;
  }

  /** The file of a quarantined entry; VMF_VOLUME_NOT_FOUND if there is none of that name. */
  async file(name: string): Promise<{ path: string; sizeBytes: number }> {
    const path = this.path(name);
    const stats = namePattern.test(name) ? await stat(path).catch(() => undefined) : undefined;
    if (!stats?.isFile()) throw new VmferryError('VMF_VOLUME_NOT_FOUND', `nothing named "${name}" in quarantine (${this.dir})`);
    return { path, sizeBytes: stats.size };
  }

  async purge(name: string): Promise<void> {
    const { path } = await this.file(name);
    await rm(path);
    await fsyncDir(this.dir);
  }

  path(name: string): string {
    return join(this.dir, `${name}.raw`);
  }
}

/**
 * Writes that survive a power loss once they resolve. A rename or a new file
 * is only durable when the directory that holds its entry has been fsynced
 * too, so every helper here syncs the data and then the directories whose
 * entries changed. Anything a later deletion relies on (a VM's spec before
 * the source's disks go, a migration half's state) is written with these.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import { VmferryError } from '../errors.ts';

/**
 * fsync of a file another process wrote (a QEMU's image): its data and block
 * allocation reach the disk, whichever descriptor wrote them.
 */
export async function fsyncFile(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** fsync of a directory: makes the entries created, renamed or removed in it durable. */
export function fsyncDir(dir: string): Promise<void> {
  return fsyncFile(dir);
}

/**
 * Replaces `path` with `data` atomically and durably: a temporary file in the
 * same directory, fsynced, renamed over the old one, then the directory
 * fsynced. After a crash the file holds either the old or the new content.
 */
export async function writeFileDurable(path: string, data: string | Uint8Array): Promise<void> {
  const temp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  const handle = await open(temp, 'wx', 0o644);
  try {
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, path);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
  await fsyncDir(dirname(path));
}

/**
 * Creates `dir` (and its missing parents) and makes its entry durable in
 * every directory from `dir` up to `root`, whether or not this call created
 * them: a directory made earlier by someone who did not fsync is no safer.
 */
export async function mkdirDurable(dir: string, root: string): Promise<void> {
  const from = resolve(root);
  const to = resolve(dir);
  const rel = relative(from, to);
  if (rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)) throw new VmferryError('VMF_INVALID_ARGUMENT', `${dir} is not inside ${root}`);
  await mkdir(to, { recursive: true });
  for (let current = to; current !== from; current = dirname(current)) await fsyncDir(dirname(current));
}

/** Moves `from` to `to` (same file system) and makes both directory entries durable. */
export async function renameDurable(from: string, to: string): Promise<void> {
  await rename(from, to);
  await fsyncDir(dirname(to));
  if (dirname(from) !== dirname(to)) await fsyncDir(dirname(from));
}

/**
 * Removes a file or a directory tree, and makes the removal durable in its parent.
 * A tree is emptied and each of its directories fsynced before it goes: POSIX does
 * not promise that an unlink inside a directory that is never synced stays done,
 * and a VM's directory that came back after a power loss would be a VM again.
 */
export async function removeDurable(path: string): Promise<void> {
  const entries = await readdir(path, { withFileTypes: true }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOTDIR' || err.code === 'ENOENT') return undefined;
    throw err;
  });
  if (entries) {
    for (const entry of entries) await (entry.isDirectory() ? removeDurable(join(path, entry.name)) : rm(join(path, entry.name), { force: true }));
    await fsyncDir(path);
  }
  await rm(path, { recursive: true, force: true });
  await fsyncDir(dirname(path));
}

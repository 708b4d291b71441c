/**
 * Writes that survive a power loss: a later step (deleting the source's disks,
 * say) may rely on them only once the data and the directory entry are on disk.
 */
import { open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';

/** Flushes a directory's entries (files created, renamed or removed in it). */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Replaces `path` with `data` atomically and durably: temp file, fsync, rename, fsync of the directory. */
export async function writeFileDurable(path: string, data: string | Uint8Array): Promise<void> {
  const temp = `${path}.tmp`;
  const handle = await open(temp, 'w');
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temp, path);
  await fsyncDir(dirname(path));
}

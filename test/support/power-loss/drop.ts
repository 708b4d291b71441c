/**
 * dropUnsynced: turns ROOT into what a power loss could leave of it, from the
 * journal the preload kept.
 *
 * The model is the weakest POSIX promise, not ext4's data=ordered or its
 * journal-commit side effects: a file's content is durable only up to its
 * last fsync/fdatasync, and a directory entry (a create, rename, unlink,
 * mkdir or rmdir in it) only once that directory was fsynced. Of what a
 * power loss may leave we take the harshest whole state (no torn mixtures):
 * - unsynced content goes back to the last synced content, or to empty for a
 *   file never synced;
 * - a name created since its directory's last fsync disappears (a file that
 *   was created, written and fsynced, but whose directory was not, is gone);
 * - a rename or an unlink since the directory's last fsync is undone (the file
 *   comes back, with its own last synced content);
 * - a directory made since its parent's last fsync vanishes, with whatever is
 *   in it, unless it holds durable content: a file whose entry in it is
 *   durable, or a directory fsynced since it was made that is not empty
 *   (entries that other programs made, e.g. qemu-img's images, count once
 *   their directory was fsynced);
 * - files the journal never mentions (those written by other programs, e.g.
 *   QEMU's images, or there before the preload) are left as they are.
 */
import { existsSync, linkSync, copyFileSync, lstatSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { Model, readJournal, shadowDirOf, type FileNode } from './journal.ts';

export interface PowerLossChange {
  /** Absolute path. */
  path: string;
  what: string;
}

export interface PowerLossReport {
  changes: PowerLossChange[];
  /** Changes under ROOT the preload saw but does not model (they were kept). */
  warnings: string[];
}

const depth = (rel: string) => (rel === '' ? 0 : rel.split('/').length);

/**
 * Call after every process that wrote under `root` with the preload is dead
 * (kill -9). Rewrites `root`, then empties the journal and its shadow
 * directory: what is left is all durable, and processes started afterwards
 * journal from there.
 */
export function dropUnsynced(journalPath: string, root: string): PowerLossReport {
  const journal = resolve(journalPath);
  const base = resolve(root);
  const model = Model.replay(base, readJournal(journal));
  const shadow = shadowDirOf(journal);
  const abs = (rel: string) => join(base, rel);
  const changes: PowerLossChange[] = [];
  const note = (rel: string, what: string) => changes.push({ path: abs(rel), what });

  // What each name holds after the power loss, for the names the journal knows.
  const wanted = new Map<string, FileNode>(model.files);
  const absent = new Set<string>();
  const dirs = new Set<string>();
  for (const [dir, entries] of model.pending) {
    for (const [name, entry] of entries) {
      const rel = join(dir, name);
      wanted.delete(rel);
      if (entry.kind === 'file') wanted.set(rel, entry.node);
      else if (entry.kind === 'dir') dirs.add(rel);
      else absent.add(rel);
    }
  }

  // Where each node's durable content is now, taken before anything moves.
  const livePath = new Map<FileNode, string>();
  for (const [rel, node] of model.files) livePath.set(node, rel);
  const staging = join(shadow, 'staging');
  mkdirSync(staging, { recursive: true });
  const sources = new Map<FileNode, string | null>();
  let staged = 0;
  for (const [rel, node] of wanted) {
    if (model.files.get(rel) === node && !node.dirty) continue;
    if (node.dirty) {
      sources.set(node, node.snap === null ? null : join(shadow, node.snap));
    } else if (livePath.has(node)) {
      const copy = join(staging, String(++staged));
      place(abs(livePath.get(node) as string), copy);
      sources.set(node, copy);
    } else if (node.keep !== null) {
      sources.set(node, join(shadow, node.keep));
    } else {
      note(rel, 'lost: no copy of its synced content was kept');
    }
  }

  for (const rel of [...dirs].sort((a, b) => depth(a) - depth(b))) {
    const stat = lstatSync(abs(rel), { throwIfNoEntry: false });
    if (stat?.isDirectory()) continue;
    if (stat) rmSync(abs(rel), { force: true });
    mkdirSync(abs(rel), { recursive: true });
    note(rel, 'directory back (its rmdir was not followed by an fsync of its parent)');
  }

  const newDirs: string[] = [];
  for (const rel of absent) {
    const stat = lstatSync(abs(rel), { throwIfNoEntry: false });
    if (!stat) continue;
    if (stat.isDirectory()) {
      newDirs.push(rel);
      continue;
    }
    rmSync(abs(rel), { force: true });
    note(rel, `gone (created or renamed here; ${dirLabel(rel)} not fsynced since)`);
  }

  for (const [rel, node] of [...wanted].sort(([a], [b]) => depth(a) - depth(b))) {
    if (!sources.has(node)) continue;
    const parent = lstatSync(dirname(abs(rel)), { throwIfNoEntry: false });
    if (!parent?.isDirectory()) {
      note(rel, 'lost: its directory is gone');
      continue;
    }
    const source = sources.get(node) as string | null;
    const movedOrUnlinked = model.files.get(rel) !== node;
    rmSync(abs(rel), { recursive: true, force: true });
    if (source === null) writeFileSync(abs(rel), '');
    else place(source, abs(rel));
    if (movedOrUnlinked) note(rel, `back with its last synced content (unlinked or renamed away; ${dirLabel(rel)} not fsynced since)`);
    else note(rel, source === null ? 'emptied (written, never fsynced)' : 'content back to its last fsync');
  }

  // Deepest first, so an enclosing new directory sees what its children kept.
  for (const rel of newDirs.sort((a, b) => depth(b) - depth(a))) {
    const inside = (path: string) => path.startsWith(`${rel}/`);
    const holdsSyncedFile = [...wanted.keys()].some((file) => inside(file) && existsSync(abs(file)));
    const holdsSyncedDir = [...model.syncedDirs].some((dir) => (dir === rel || inside(dir)) && existsSync(abs(dir)) && readdirSync(abs(dir)).length > 0);
    if (holdsSyncedFile || holdsSyncedDir) continue;
    const entries = readdirSync(abs(rel)).length;
    rmSync(abs(rel), { recursive: true, force: true });
    note(rel, `directory gone with its ${entries} entries (made here; ${dirLabel(rel)} not fsynced since)`);
  }

  rmSync(shadow, { recursive: true, force: true });
  writeFileSync(journal, '');
  return { changes, warnings: model.warnings };
}

function dirLabel(rel: string): string {
  const dir = dirname(rel);
  return dir === '.' ? 'ROOT' : dir;
}

/** A hard link (a copy across file systems) of `from` at `to`. */
function place(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw err;
    copyFileSync(from, to);
  }
}

/**
 * The power-loss journal: one JSON event per line, appended by the preload
 * (preload.ts) before each change under ROOT and after each successful fsync,
 * and replayed into a Model by the preload itself (after an agent restart) and
 * by dropUnsynced (drop.ts). Paths are relative to ROOT ('' is ROOT itself);
 * `snap` and `keep` name files in the shadow directory next to the journal.
 */
import { existsSync, readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';

export type JournalEvent =
  /** A process started journaling ROOT. */
  | { op: 'start'; root: string; pid: number }
  /** A new, empty file at `p`, about to be written. */
  | { op: 'create'; p: string }
  /** The first change of `p`'s content since its last fsync; `snap` holds the synced content (null: it was empty). */
  | { op: 'dirty'; p: string; snap: string | null }
  /** fsync/fdatasync of file `p` succeeded. */
  | { op: 'fsync'; p: string }
  /** fsync of directory `p` succeeded: its entries are durable. */
  | { op: 'dirsync'; p: string }
  /** Rename of a file; `was` is what `to` held before, `keep` a hard link to the file it replaced. */
  | { op: 'rename'; from: string; to: string; was: 'absent' | 'file' | 'dir'; keep: string | null }
  /** Rename of a directory: not modelled as undoable, see Model.apply. */
  | { op: 'rename-dir'; from: string; to: string }
  /** Unlink of file `p`; `keep` is a hard link to it, so an undo can bring it back. */
  | { op: 'unlink'; p: string; keep: string | null }
  | { op: 'mkdir'; p: string }
  | { op: 'rmdir'; p: string }
  /** A change the preload does not model (an fs function it does not wrap), reported as a warning. */
  | { op: 'unmodelled'; fn: string; p: string };

/** One file (inode) as the model knows it. */
export interface FileNode {
  /** Content changed since its last fsync. */
  dirty: boolean;
  /** While dirty: the shadow copy of its last synced content, or null for empty. */
  snap: string | null;
  /** Once unlinked or replaced by a rename: a shadow hard link to it. */
  keep: string | null;
}

/** What a directory entry was at the directory's last fsync. */
export type SyncedEntry = { kind: 'absent' } | { kind: 'dir' } | { kind: 'file'; node: FileNode };

export function shadowDirOf(journalPath: string): string {
  return `${journalPath}.shadow`;
}

/** The events of a journal; a torn last line (a write cut short) is ignored. */
export function readJournal(journalPath: string): JournalEvent[] {
  if (!existsSync(journalPath)) return [];
  const lines = readFileSync(journalPath, 'utf8').split('\n');
  lines.pop();
  return lines.filter((line) => line !== '').map((line) => JSON.parse(line) as JournalEvent);
}

/**
 * What is durable under ROOT: per tracked file its dirty state, per directory
 * the entries changed since its last fsync with what they were at that fsync.
 * A file the journal never mentions counts as durable as it is.
 */
export class Model {
  readonly root: string;
  /** Tracked files at their current paths. */
  readonly files = new Map<string, FileNode>();
  /** Directory -> name -> the entry at the directory's last fsync, for names changed since. */
  readonly pending = new Map<string, Map<string, SyncedEntry>>();
  /** Directories fsynced since they were made: what was in them then (written by anyone) is durable content. */
  readonly syncedDirs = new Set<string>();
  readonly warnings: string[] = [];

  constructor(root: string) {
    this.root = root;
  }

  static replay(root: string, events: JournalEvent[]): Model {
    const model = new Model(root);
    for (const event of events) model.apply(event);
    return model;
  }

  apply(event: JournalEvent): void {
    switch (event.op) {
      case 'start':
        if (event.root !== this.root) throw new Error(`power-loss journal of ${event.root} replayed for ${this.root}`);
        return;
      case 'create': {
        this.#record(event.p, { kind: 'absent' });
        this.files.set(event.p, { dirty: true, snap: null, keep: null });
        return;
      }
      case 'dirty': {
        const node = this.#nodeAt(event.p);
        node.dirty = true;
        node.snap = event.snap;
        return;
      }
      case 'fsync': {
        const node = this.files.get(event.p);
        if (node) {
          node.dirty = false;
          node.snap = null;
        }
        return;
      }
      case 'dirsync':
        this.pending.delete(event.p);
        this.syncedDirs.add(event.p);
        return;
      case 'rename': {
        const node = this.#nodeAt(event.from);
        this.#record(event.from, { kind: 'file', node });
        if (event.was === 'file') {
          const replaced = this.#nodeAt(event.to);
          replaced.keep = event.keep;
          this.#record(event.to, { kind: 'file', node: replaced });
        } else {
          this.#record(event.to, { kind: event.was });
        }
        this.files.delete(event.from);
        this.files.set(event.to, node);
        return;
      }
      case 'rename-dir':
        // Kept as if durable at once: vmferry's agent never renames a directory,
        // and undoing one would mean moving a whole tree back.
        this.warnings.push(`directory rename ${event.from} -> ${event.to} treated as durable (not modelled)`);
        this.#rekey(event.from, event.to);
        return;
      case 'unlink': {
        const node = this.#nodeAt(event.p);
        node.keep = event.keep;
        this.#record(event.p, { kind: 'file', node });
        this.files.delete(event.p);
        return;
      }
      case 'mkdir':
        this.#record(event.p, { kind: 'absent' });
        this.syncedDirs.delete(event.p);
        return;
      case 'rmdir':
        this.#record(event.p, { kind: 'dir' });
        this.syncedDirs.delete(event.p);
        return;
      case 'unmodelled':
        this.warnings.push(`${event.fn} on ${event.p} is not modelled: its effect counts as durable`);
        return;
    }
  }

  /** The node of a file at `p`; a file the journal never saw is durable as it is. */
  #nodeAt(p: string): FileNode {
    let node = this.files.get(p);
    if (!node) {
      node = { dirty: false, snap: null, keep: null };
      this.files.set(p, node);
    }
    return node;
  }

  /** Notes what entry `p` had at its directory's last fsync, unless an earlier change already did. */
  #record(p: string, entry: SyncedEntry): void {
    const dir = dirname(p) === '.' ? '' : dirname(p);
    let entries = this.pending.get(dir);
    if (!entries) {
      entries = new Map();
      this.pending.set(dir, entries);
    }
    if (!entries.has(basename(p))) entries.set(basename(p), entry);
  }

  #rekey(from: string, to: string): void {
    const move = <T>(map: Map<string, T>) => {
      for (const [key, value] of [...map]) {
        if (key !== from && !key.startsWith(`${from}/`)) continue;
        map.delete(key);
        map.set(join(to, key.slice(from.length)), value);
      }
    };
    move(this.files);
    move(this.pending);
    for (const dir of [...this.syncedDirs]) {
      if (dir !== from && !dir.startsWith(`${from}/`)) continue;
      this.syncedDirs.delete(dir);
      this.syncedDirs.add(join(to, dir.slice(from.length)));
    }
  }
}

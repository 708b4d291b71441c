/**
 * Where an agent puts files it cannot account for, instead of deleting them:
 *
 *   DATA/quarantine/ID/note.json   what was moved, from where, and why
 *   DATA/quarantine/ID/pool/FILE   pool images
 *   DATA/quarantine/ID/vm/         the VM directory (with its unreadable spec)
 *
 * Nothing here deletes on its own: a restore moves the files back, a purge
 * (asked for by a person) is the only deletion. Every move is fsynced, so a
 * crash leaves each file either where it was or in the quarantine, never lost.
 */
import { lstat, readdir, readFile } from 'node:fs/promises';
import { basename, join, resolve, sep } from 'node:path';
import type { QuarantineEntry } from '../api/agent-types.ts';
import { VmferryError } from '../errors.ts';
import { mkdirDurable, removeDurable, renameDurable, writeFileDurable } from '../util/durable-file.ts';

export type QuarantineKind = QuarantineEntry['items'][number]['kind'];

interface StoredNote {
  id: string;
  vm: string;
  reason: string;
  at: number;
  items: { kind: QuarantineKind; from: string; stored: string }[];
}

const idPattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const subdirOf: Record<QuarantineKind, string> = { 'pool-image': 'pool', 'vm-dir': 'vm' };

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(
    () => true,
    () => false,
  );
}

/** Bytes of a file, or of every file under a directory; null when the path is gone. */
async function sizeOf(path: string): Promise<number | null> {
  const stats = await lstat(path).catch(() => undefined);
  if (!stats) return null;
  if (!stats.isDirectory()) return stats.size;
  let total = 0;
  for (const name of await readdir(path)) total += (await sizeOf(join(path, name))) ?? 0;
  return total;
}

/** "2026-11-29T23:45:01.123Z" → "20261129T234501Z": sorts by time and is a valid id. */
function stamp(at: number): string {
  return new Date(at).toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
}

export class Quarantine {
  readonly dir: string;
  /** Every path moved in or out lies under it (the agent's data directory). */
  readonly #root: string;

  constructor(root: string) {
    this.#root = resolve(root);
    this.dir = join(this.#root, 'quarantine');
  }

  /**
   * Moves `paths` (which must exist) into a new entry and records why. The
   * note is durable before the first move, so every moved file is listed.
   */
  async hold(vm: string, reason: string, paths: { kind: QuarantineKind; path: string }[]): Promise<QuarantineEntry> {
    const at = Date.now();
    // At most 63 characters of the name (a VM name's limit): ids stay below the servers' 100-character path parameters.
    const base = `${stamp(at)}-${vm.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 63)}`;
    let id = base;
    for (let n = 2; await exists(join(this.dir, id)); n++) id = `${base}.${n}`;
    const entryDir = join(this.dir, id);
    const note: StoredNote = { id, vm, reason, at, items: paths.map(({ kind, path }) => ({ kind, from: resolve(path), stored: join(subdirOf[kind], basename(path)) })) };
    await mkdirDurable(entryDir, this.#root);
    for (const subdir of new Set(note.items.map((item) => subdirOf[item.kind]))) await mkdirDurable(join(entryDir, subdir), entryDir);
    await writeFileDurable(join(entryDir, 'note.json'), JSON.stringify(note, null, 2));
    for (const item of note.items) await renameDurable(item.from, join(entryDir, item.stored));
    return this.#describe(note);
  }

  async list(): Promise<QuarantineEntry[]> {
    const ids = await readdir(this.dir).catch(() => [] as string[]);
    const entries: QuarantineEntry[] = [];
    for (const id of ids.sort()) {
      if (!idPattern.test(id)) continue;
      const note = await this.#note(id).catch(() => undefined);
      // An entry without a readable note is one whose hold was cut off before its note: nothing was moved into it yet.
      if (note) entries.push(await this.#describe(note));
    }
    return entries;
  }

  /** The VM directories held, where they are now: a restarted agent reads the records left in them (vm-registry.ts). */
  async heldVmDirs(): Promise<{ entry: QuarantineEntry; dir: string }[]> {
    const held: { entry: QuarantineEntry; dir: string }[] = [];
    for (const entry of await this.list()) {
      const note = await this.#note(entry.id);
      for (const item of note.items) if (item.kind === 'vm-dir') held.push({ entry, dir: join(this.dir, entry.id, item.stored) });
    }
    return held;
  }

  /**
   * Puts every file back where it came from. Refused when something already
   * exists at one of those places: a restore never overwrites.
   */
  async restore(id: string): Promise<QuarantineEntry> {
    const note = await this.#note(id);
    const entryDir = join(this.dir, id);
    const pending: StoredNote['items'] = [];
    const occupied: string[] = [];
    for (const item of note.items) {
      const stored = join(entryDir, item.stored);
      const storedExists = await exists(stored);
      const fromExists = await exists(item.from);
      // A restore cut off half-way already moved this one back.
      if (!storedExists && fromExists) continue;
      if (!storedExists) throw new VmferryError('VMF_CONFLICT', `quarantine ${id} no longer holds ${item.stored}, and nothing is at ${item.from}`);
      if (fromExists) occupied.push(item.from);
      pending.push(item);
    }
    if (occupied.length) throw new VmferryError('VMF_CONFLICT', `cannot restore quarantine ${id}: ${occupied.join(', ')} exist now; move them away or purge the entry`);
    const described = await this.#describe(note);
    for (const item of pending) await renameDurable(join(entryDir, item.stored), item.from);
    await removeDurable(entryDir);
    return described;
  }

  /** Deletes an entry and its files: the one deletion, asked for by a person. */
  async purge(id: string): Promise<void> {
    await this.#note(id);
    await removeDurable(join(this.dir, id));
  }

  async #note(id: string): Promise<StoredNote> {
    if (!idPattern.test(id)) throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid quarantine id "${id}"`);
    const text = await readFile(join(this.dir, id, 'note.json'), 'utf8').catch(() => undefined);
    if (text === undefined) throw new VmferryError('VMF_NOT_FOUND', `no quarantine entry ${id} in ${this.dir}`);
    let note: StoredNote;
    try {
      note = JSON.parse(text) as StoredNote;
    } catch (err) {
      throw new VmferryError('VMF_CONFLICT', `quarantine ${id} has an unreadable note.json: ${(err as Error).message}`, { cause: err });
    }
    // The note decides where a restore writes: only back into this agent's data directory.
    for (const item of note.items) {
      const inside = (path: string, dir: string): boolean => resolve(path).startsWith(dir + sep);
      if (!inside(item.from, this.#root) || !inside(join(this.dir, id, item.stored), join(this.dir, id))) {
        throw new VmferryError('VMF_CONFLICT', `quarantine ${id} has a note naming a path outside ${this.#root}: ${item.from}`);
      }
    }
    return note;
  }

  async #describe(note: StoredNote): Promise<QuarantineEntry> {
    const entryDir = join(this.dir, note.id);
    const items = await Promise.all(note.items.map(async (item) => ({ kind: item.kind, from: item.from, sizeBytes: await sizeOf(join(entryDir, item.stored)) })));
    return { id: note.id, vm: note.vm, reason: note.reason, at: note.at, items };
  }
}

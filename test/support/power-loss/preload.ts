/**
 * Preload of a process whose unsynced writes a simulated power loss drops
 * (how a harness uses it: index.ts). Active only when both
 * VMFERRY_POWERLOSS_JOURNAL and VMFERRY_POWERLOSS_ROOT are set; it then wraps
 * what changes files and directory entries under ROOT through node:fs/promises
 * and FileHandle (all that vmferry's agent uses for its data directory) and
 * journals each change before it happens and each fsync after it succeeded.
 * The journal is written with writeSync, so it is on disk (in the page cache,
 * which a kill -9 keeps) before the change itself is.
 */
import fs, { constants, type PathLike } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { syncBuiltinESMExports } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Model, readJournal, shadowDirOf, type FileNode, type JournalEvent } from './journal.ts';

/** Originals, for the preload's own bookkeeping. */
const raw = {
  lstat: fs.lstatSync,
  readdir: fs.readdirSync,
  link: fs.linkSync,
  copyFile: fs.copyFileSync,
  unlink: fs.unlinkSync,
  fstat: fs.fstatSync,
};

const writeFlags = constants.O_WRONLY | constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC | constants.O_APPEND;

class Tracker {
  readonly root: string;
  readonly #model: Model;
  readonly #journalFd: number;
  readonly #shadow: string;
  /** Descriptors opened under ROOT: what they name, and whether it is a directory. */
  readonly #fds = new Map<number, { path: string; dir: boolean }>();
  #counter = 0;

  constructor(journalPath: string, root: string) {
    this.root = root;
    if (this.relative(journalPath) !== undefined) throw new Error(`VMFERRY_POWERLOSS_JOURNAL (${journalPath}) must not be inside VMFERRY_POWERLOSS_ROOT (${root})`);
    this.#model = Model.replay(root, readJournal(journalPath));
    this.#shadow = shadowDirOf(journalPath);
    fs.mkdirSync(this.#shadow, { recursive: true });
    this.#journalFd = fs.openSync(journalPath, 'a');
    this.#emit({ op: 'start', root, pid: process.pid });
  }

  /** `path` relative to ROOT ('' for ROOT), or undefined when outside it or not a path. */
  relative(path: unknown): string | undefined {
    let text: string;
    if (typeof path === 'string') text = path;
    else if (path instanceof URL) text = fileURLToPath(path);
    else if (Buffer.isBuffer(path)) text = path.toString();
    else return undefined;
    const rel = relative(this.root, resolve(text));
    return rel === '..' || rel.startsWith('../') || rel.startsWith('/') ? undefined : rel;
  }

  #abs(rel: string): string {
    return join(this.root, rel);
  }

  #emit(event: JournalEvent): void {
    fs.writeSync(this.#journalFd, `${JSON.stringify(event)}\n`);
    this.#model.apply(event);
  }

  /** What is at `rel`, if anything (undefined too where a parent is not a directory: the operation itself then fails). */
  #stat(rel: string): fs.Stats | undefined {
    try {
      return raw.lstat(this.#abs(rel), { throwIfNoEntry: false });
    } catch {
      return undefined;
    }
  }

  #shadowName(kind: string): string {
    return `${kind}-${process.pid}-${++this.#counter}`;
  }

  /** A hard link in the shadow directory (a copy across file systems) that keeps `rel`'s file after its name goes. */
  #keep(rel: string): string {
    const name = this.#shadowName('keep');
    try {
      raw.link(this.#abs(rel), join(this.#shadow, name));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw err;
      raw.copyFile(this.#abs(rel), join(this.#shadow, name));
    }
    return name;
  }

  /** Before `rel`'s content changes: journals a new file, or snapshots the last synced content of a clean one. */
  beforeWrite(rel: string, creates: boolean): void {
    if (this.#model.files.get(rel)?.dirty) return;
    const stat = this.#stat(rel);
    if (!stat) {
      if (creates) this.#emit({ op: 'create', p: rel });
      return;
    }
    if (!stat.isFile()) return;
    let snap: string | null = null;
    if (stat.size > 0) {
      snap = this.#shadowName('snap');
      raw.copyFile(this.#abs(rel), join(this.#shadow, snap), constants.COPYFILE_FICLONE);
    }
    this.#emit({ op: 'dirty', p: rel, snap });
  }

  beforeWriteFd(fd: number): void {
    const entry = this.#fds.get(fd);
    if (entry && !entry.dir) this.beforeWrite(entry.path, false);
  }

  beforeOpen(rel: string, flags: fs.OpenMode | undefined): void {
    const bits = typeof flags === 'number' ? flags : undefined;
    const text = typeof flags === 'string' ? flags : bits === undefined ? 'r' : '';
    const writes = bits !== undefined ? (bits & writeFlags) !== 0 : /[wa+]/.test(text);
    // Marked dirty at open: the descriptor may be handed to a child (QEMU's log) whose writes are not seen.
    if (writes) this.beforeWrite(rel, bits !== undefined ? (bits & constants.O_CREAT) !== 0 : /[wax]/.test(text));
  }

  opened(rel: string, fd: number): void {
    this.#fds.set(fd, { path: rel, dir: raw.fstat(fd).isDirectory() });
  }

  closed(fd: number): void {
    this.#fds.delete(fd);
  }

  synced(fd: number): void {
    const entry = this.#fds.get(fd);
    if (!entry) return;
    if (entry.dir) {
      if (!this.#model.pending.has(entry.path) && this.#model.syncedDirs.has(entry.path)) return;
      const forgotten = [...(this.#model.pending.get(entry.path)?.values() ?? [])].flatMap((e) => (e.kind === 'file' ? [e.node] : []));
      this.#emit({ op: 'dirsync', p: entry.path });
      this.#dropShadows(forgotten);
      return;
    }
    const node = this.#model.files.get(entry.path);
    if (!node?.dirty) return;
    const snap = node.snap;
    this.#emit({ op: 'fsync', p: entry.path });
    if (snap) raw.unlink(join(this.#shadow, snap));
  }

  /** Shadow copies of files no name can bring back any more (an unlink or a rename over them is durable now). */
  #dropShadows(nodes: FileNode[]): void {
    const reachable = new Set(this.#model.files.values());
    for (const entries of this.#model.pending.values()) for (const e of entries.values()) if (e.kind === 'file') reachable.add(e.node);
    for (const node of nodes) {
      if (reachable.has(node)) continue;
      for (const name of [node.keep, node.snap]) if (name !== null) raw.unlink(join(this.#shadow, name));
      node.keep = null;
      node.snap = null;
    }
  }

  beforeRename(from: string, to: string): void {
    const source = this.#stat(from);
    if (!source || from === to) return;
    if (source.isDirectory()) {
      this.#emit({ op: 'rename-dir', from, to });
      return;
    }
    if (!source.isFile()) return;
    const target = this.#stat(to);
    const was = !target ? 'absent' : target.isDirectory() ? 'dir' : 'file';
    this.#emit({ op: 'rename', from, to, was, keep: target?.isFile() ? this.#keep(to) : null });
  }

  /** Before an unlink, rmdir or rm: journals every file and directory that goes, deepest first. */
  beforeRemove(rel: string, how: 'unlink' | 'rmdir' | 'rm', recursive: boolean): void {
    const stat = this.#stat(rel);
    if (!stat) return;
    if (stat.isDirectory()) {
      if (how === 'unlink' || (how === 'rm' && !recursive)) return;
      if (recursive) for (const name of raw.readdir(this.#abs(rel))) this.beforeRemove(join(rel, name), how, true);
      if (rel !== '') this.#emit({ op: 'rmdir', p: rel });
    } else if (stat.isFile() && how !== 'rmdir') {
      this.#emit({ op: 'unlink', p: rel, keep: this.#keep(rel) });
    }
  }

  beforeMkdir(rel: string, recursive: boolean): void {
    const missing: string[] = [];
    for (let p = rel; p !== '' && p !== '.' && !this.#stat(p); p = dirname(p)) missing.unshift(p);
    if (!recursive && missing.length > 1) return;
    for (const p of missing) this.#emit({ op: 'mkdir', p });
  }

  unmodelled(fn: string, rel: string): void {
    this.#emit({ op: 'unmodelled', fn, p: rel });
  }
}

type AnyFunction = (...args: never[]) => unknown;

/** Replaces `target[name]` with a wrapper built from the original. */
function wrap<T extends object, K extends keyof T>(target: T, name: K, make: (original: T[K]) => T[K]): void {
  target[name] = make(target[name]);
}

function install(tracker: Tracker, fileHandle: FileHandle): void {
  const fsp = fs.promises;
  const rel = (path: unknown) => tracker.relative(path);
  const fdOf = (file: unknown) => (typeof file === 'number' ? file : isHandle(file) ? file.fd : undefined);
  const isHandle = (file: unknown): file is FileHandle => typeof file === 'object' && file !== null && Object.getPrototypeOf(file) === handleProto;
  const handleProto = Object.getPrototypeOf(fileHandle) as FileHandle;

  const pathWrite = (defaultFlag: string) => (file: unknown, options: unknown) => {
    const fd = fdOf(file);
    if (fd !== undefined) return tracker.beforeWriteFd(fd);
    const path = rel(file);
    if (path === undefined) return;
    const flag = typeof options === 'object' && options !== null && 'flag' in options ? String(options.flag) : defaultFlag;
    tracker.beforeOpen(path, flag);
  };
  const beforeWriteFile = pathWrite('w');
  const beforeAppendFile = pathWrite('a');

  wrap(fsp, 'writeFile', (original) => async (file, data, options) => {
    beforeWriteFile(file, options);
    return original(file, data, options);
  });
  wrap(fsp, 'appendFile', (original) => async (file, data, options) => {
    beforeAppendFile(file, options);
    return original(file, data, options);
  });
  wrap(fsp, 'open', (original) => async (path, flags, mode) => {
    const target = rel(path);
    if (target === undefined) return original(path, flags, mode);
    tracker.beforeOpen(target, flags);
    const handle = await original(path, flags, mode);
    tracker.opened(target, handle.fd);
    return handle;
  });
  wrap(fsp, 'truncate', (original) => async (path, len) => {
    const target = rel(path);
    if (target !== undefined) tracker.beforeWrite(target, false);
    return original(path, len);
  });
  wrap(fsp, 'copyFile', (original) => async (src, dest, mode) => {
    const target = rel(dest);
    if (target !== undefined) tracker.beforeWrite(target, true);
    return original(src, dest, mode);
  });
  wrap(fsp, 'rename', (original) => async (oldPath, newPath) => {
    const from = rel(oldPath);
    const to = rel(newPath);
    if (from !== undefined && to !== undefined) tracker.beforeRename(from, to);
    else if (from !== undefined || to !== undefined) tracker.unmodelled('rename across ROOT', (from ?? to) as string);
    return original(oldPath, newPath);
  });
  wrap(fsp, 'unlink', (original) => async (path) => {
    const target = rel(path);
    if (target !== undefined) tracker.beforeRemove(target, 'unlink', false);
    return original(path);
  });
  wrap(fsp, 'rmdir', (original) => async (path, options) => {
    const target = rel(path);
    if (target !== undefined) tracker.beforeRemove(target, 'rmdir', options?.recursive ?? false);
    return original(path, options);
  });
  wrap(fsp, 'rm', (original) => async (path, options) => {
    const target = rel(path);
    if (target !== undefined) tracker.beforeRemove(target, 'rm', options?.recursive ?? false);
    return original(path, options);
  });
  wrap(fsp, 'mkdir', (original) => (async (path: PathLike, options?: fs.MakeDirectoryOptions | fs.Mode | null) => {
    const target = rel(path);
    if (target !== undefined) tracker.beforeMkdir(target, typeof options === 'object' && options !== null && options.recursive === true);
    return original(path, options);
  }) as typeof original);

  const proto = handleProto as unknown as Record<string, (this: FileHandle, ...args: never[]) => Promise<unknown>>;
  for (const name of ['write', 'writev', 'writeFile', 'appendFile', 'truncate']) {
    wrap(proto, name, (original) =>
      async function (this: FileHandle, ...args: never[]) {
        tracker.beforeWriteFd(this.fd);
        return original.apply(this, args);
      },
    );
  }
  for (const name of ['sync', 'datasync']) {
    wrap(proto, name, (original) =>
      async function (this: FileHandle, ...args: never[]) {
        const fd = this.fd;
        await original.apply(this, args);
        tracker.synced(fd);
      },
    );
  }
  wrap(proto, 'close', (original) =>
    async function (this: FileHandle, ...args: never[]) {
      tracker.closed(this.fd);
      return original.apply(this, args);
    },
  );

  // The agent does not change its data directory with these; a use under ROOT is reported, not modelled.
  const unmodelled = ['writeFileSync', 'appendFileSync', 'renameSync', 'unlinkSync', 'rmSync', 'rmdirSync', 'mkdirSync', 'copyFileSync', 'truncateSync', 'writeFile', 'appendFile', 'rename', 'unlink', 'rm', 'rmdir', 'mkdir', 'copyFile', 'truncate'] as const;
  const fsFunctions = fs as unknown as Record<string, AnyFunction>;
  for (const name of unmodelled) {
    wrap(fsFunctions, name, (original) =>
      function (this: unknown, ...args: never[]) {
        const target = rel(args[name.startsWith('copyFile') ? 1 : 0]);
        if (target !== undefined) tracker.unmodelled(`fs.${name}`, target);
        return original.apply(this, args);
      },
    );
  }
  syncBuiltinESMExports();
}

const journalPath = process.env.VMFERRY_POWERLOSS_JOURNAL;
const rootPath = process.env.VMFERRY_POWERLOSS_ROOT;
if (journalPath || rootPath) {
  if (!journalPath || !rootPath) throw new Error('the power-loss preload needs both VMFERRY_POWERLOSS_JOURNAL and VMFERRY_POWERLOSS_ROOT');
  const tracker = new Tracker(resolve(journalPath), resolve(rootPath));
  const probe = await fs.promises.open(process.execPath, 'r');
  try {
    install(tracker, probe);
  } finally {
    await probe.close();
  }
}

/**
 * The storage server's volumes: sparse raw files in DATA/volumes, described by
 * a SQLite catalog (name, size, read-only, created, an id of its own, current
 * attachments). A volume exists once its catalog row does; the file is made
 * durable first, so a crash never leaves a row without its file, and a file
 * without a row is moved to quarantine (quarantine.ts), never deleted on a guess.
 *
 * Creating, opening, resizing and deleting one volume run one at a time, and
 * an NBD client counts as attached from the moment its open starts: a delete
 * either sees the client and is refused, or runs first and the open fails.
 * Open files are keyed by the volume's id, not its name, so a volume created
 * again under an old name never shares the old volume's handle.
 *
 * Also the NBD server's ExportProvider: an export's name is its volume's name,
 * optionally followed by `@TOKEN`, the client's name for the one-writer fence
 * (writer-leases.ts).
 */
import Database from 'better-sqlite3';
import { randomUUID } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { VmferryError } from '../errors.ts';
import type { ExportInfo, ExportProvider, NbdBackend } from '../nbd/backend.ts';
import { sharedReconnectDelayS } from '../qemu/command-line.ts';
import { FsHelper } from './fs-helper.ts';
import { loadCachedRead, type CachedRead } from './cached-read.ts';
import { KeyedQueue } from './keyed-queue.ts';
import { Quarantine, type QuarantinedFile } from './quarantine.ts';
import { fsyncDir } from '../util/durable-file.ts';
import { FencedBackend, FileBackend, ReadOnlyBackend, StickyErrorBackend, VolumeHealth } from './volume-backends.ts';
import { TrafficCounters, type VolumeStats } from './traffic.ts';
import type { VolumeMetrics } from './metrics.ts';
import { WriterLeases, parseExportName, publicLease, writerTokenPattern, type PublicLease } from './writer-leases.ts';
import { namePattern, nameRule } from '../util/names.ts';

export interface Volume {
  name: string;
  sizeBytes: number;
  readOnly: boolean;
  createdAt: number;
  /** Clients attached right now (host:port of each NBD connection, and its writer token if it gave one). */
  attachments: string[];
  /** The writer lease, once one was granted (until then every client may write); its token is never shown. */
  writer: PublicLease | null;
  /** When its last client detached (ms since the epoch), null if none did since the server started. */
  lastDetachedAt: number | null;
}

interface VolumeRow {
  /** Unique to this volume: a volume deleted and created again under its name gets a new one. */
  id: string;
  name: string;
  size_bytes: number;
  read_only: number;
  created_at: number;
}

/**
 * How long after its last client detached a volume still counts as in use:
 * QEMU retries a lost NBD connection for this long (reconnect-delay), and must
 * find the same volume, not nothing or a new empty one of the same name.
 */
export const reconnectWindowMs = sharedReconnectDelayS * 1000;

export interface VolumeServiceOptions {
  /** Wraps each open volume's file backend, below the server's own layers: for fault injection in tests. */
  fileLayer?: (backend: NbdBackend, volume: string) => NbdBackend;
  /** How long a writer grant waits for the old writer's writes (default 30 s). */
  drainTimeoutMs?: number;
}

/** One volume's open file and what its connections share. */
interface OpenFile {
  file: FileHandle;
  health: VolumeHealth;
  users: number;
}

/** Largest volume: 2^50 bytes is far beyond these machines and still exact in a JS number. */
export const maxVolumeBytes = 2 ** 50;

function checkVolumeSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 512 || sizeBytes > maxVolumeBytes || sizeBytes % 512 !== 0) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid size ${sizeBytes}: a multiple of 512 bytes from 512 B to 1 PiB`);
  }
}

export class VolumeService implements ExportProvider {
  readonly #db: Database.Database;
  readonly #dir: string;
  readonly #logger: Logger;
  readonly #helper: FsHelper | undefined;
  readonly #cachedRead: CachedRead | undefined;
  readonly #options: VolumeServiceOptions;
  readonly leases: WriterLeases;
  readonly quarantine: Quarantine;
  /** Create, open, resize, restore and delete, one at a time per volume name. */
  readonly #changes = new KeyedQueue();
  /** One open file per volume id, shared by its connections. */
  readonly #files = new Map<string, OpenFile>();
  /** Each NBD connection's open volume, by the connection's client name. */
  readonly #connections = new Map<string, { name: string; id: string }>();
  /** When each volume (by id) last lost a client. */
  readonly #lastDetached = new Map<string, number>();
  /** Bytes each volume's clients read and wrote (traffic.ts). */
  readonly #traffic = new TrafficCounters();
  /** Set while the server shuts down: the clients leaving now will reconnect to the next server, so the catalog keeps them. */
  #stopping = false;

  private constructor(db: Database.Database, dataDir: string, logger: Logger, helper: FsHelper | undefined, cachedRead: CachedRead | undefined, options: VolumeServiceOptions) {
    this.#db = db;
    this.#dir = join(dataDir, 'volumes');
    this.#logger = logger;
    this.#helper = helper;
    this.#cachedRead = cachedRead;
    this.#options = options;
    this.leases = new WriterLeases(db, options.drainTimeoutMs === undefined ? {} : { drainTimeoutMs: options.drainTimeoutMs });
    this.quarantine = new Quarantine(join(dataDir, 'quarantine'));
  }

  static async open(dataDir: string, logger: Logger, options: VolumeServiceOptions = {}): Promise<VolumeService> {
    await mkdir(join(dataDir, 'volumes'), { recursive: true });
    const db = new Database(join(dataDir, 'catalog.db'));
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.exec(`
      CREATE TABLE IF NOT EXISTS volumes (name TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, read_only INTEGER NOT NULL, created_at INTEGER NOT NULL, id TEXT);
      CREATE TABLE IF NOT EXISTS attachments (volume TEXT NOT NULL, client TEXT NOT NULL, since INTEGER NOT NULL, PRIMARY KEY (volume, client));
    `);
    if (!(db.pragma('table_info(volumes)') as { name: string }[]).some((column) => column.name === 'id')) db.exec('ALTER TABLE volumes ADD COLUMN id TEXT');
    db.exec('UPDATE volumes SET id = lower(hex(randomblob(16))) WHERE id IS NULL');
    const service = new VolumeService(db, dataDir, logger, await FsHelper.start(logger), await loadCachedRead(logger), options);
    // Clients attached when the server stopped are reconnecting now: their volumes are in use from this moment.
    const attached = db.prepare('SELECT DISTINCT v.id FROM attachments a JOIN volumes v ON v.name = a.volume').all() as { id: string }[];
    for (const { id } of attached) service.#lastDetached.set(id, Date.now());
    db.exec('DELETE FROM attachments');
    await service.#quarantineOrphans();
    return service;
  }

  list(): ExportInfo[] {
    return this.volumes().map((v) => ({ name: v.name, description: `${v.sizeBytes} bytes${v.readOnly ? ', read-only' : ''}` }));
  }

  has(exportName: string): boolean {
    return this.#resolveExport(exportName) !== undefined;
  }

  volumes(): Volume[] {
    const rows = this.#db.prepare('SELECT * FROM volumes ORDER BY name').all() as VolumeRow[];
    return rows.map((row) => this.#toVolume(row));
  }

  get(name: string): Volume {
    const row = this.#row(name);
    if (!row) throw new VmferryError('VMF_VOLUME_NOT_FOUND', `no volume named "${name}"`);
    return this.#toVolume(row);
  }

  async create(name: string, sizeBytes: number, readOnly = false): Promise<Volume> {
    if (!namePattern.test(name)) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid volume name "${name}": ${nameRule}`);
    }
    checkVolumeSize(sizeBytes);
    return this.#changes.run(name, async () => {
      if (this.#row(name)) throw new VmferryError('VMF_VOLUME_EXISTS', `volume "${name}" already exists`);
      await this.#createFile(name, sizeBytes);
      this.#insert(name, sizeBytes, readOnly);
      this.#logger.info({ volume: name, sizeBytes, readOnly }, 'volume created');
      return this.get(name);
    });
  }

  /** The volume's file, sized and durable; removed again if that fails, so the name stays free. */
  async #createFile(name: string, sizeBytes: number): Promise<void> {
    const path = this.#path(name);
    const file = await open(path, 'wx');
    try {
      try {
        await file.truncate(sizeBytes);
        await file.sync();
      } finally {
        await file.close();
      }
      await fsyncDir(this.#dir);
    } catch (err) {
      await rm(path, { force: true });
      throw err;
    }
  }

  resize(name: string, sizeBytes: number): Promise<Volume> {
    checkVolumeSize(sizeBytes);
    return this.#changes.run(name, async () => {
      const volume = this.get(name);
      if (sizeBytes < volume.sizeBytes && volume.attachments.length > 0) {
        throw new VmferryError('VMF_CONFLICT', `volume "${name}" has clients (${volume.attachments.join(', ')}); it cannot shrink under them`);
      }
      const file = await open(this.#path(name), 'r+');
      try {
        await file.truncate(sizeBytes);
        await file.sync();
      } finally {
        await file.close();
      }
      this.#db.prepare('UPDATE volumes SET size_bytes = ? WHERE name = ?').run(sizeBytes, name);
      this.#logger.info({ volume: name, from: volume.sizeBytes, to: sizeBytes }, 'volume resized (new connections see the new size)');
      return this.get(name);
    });
  }

  /**
   * Deletes a volume. Without `force`, refused (VMF_CONFLICT, saying why)
   * while it has a client, a held writer lease, or lost a client less than
   * reconnectWindowMs ago. With it, clients still attached get EIO from then on.
   */
  remove(name: string, options: { force?: boolean } = {}): Promise<void> {
    return this.#changes.run(name, async () => {
      const row = this.#row(name);
      if (!row) throw new VmferryError('VMF_VOLUME_NOT_FOUND', `no volume named "${name}"`);
      const inUse = this.#whyInUse(row);
      if (inUse && !options.force) throw new VmferryError('VMF_CONFLICT', `volume "${name}" ${inUse}, or delete it anyway with --force (?force=true)`);
      this.#db.prepare('DELETE FROM volumes WHERE name = ?').run(name);
      this.#db.prepare('DELETE FROM attachments WHERE volume = ?').run(name);
      this.leases.forget(name);
      const open = this.#files.get(row.id);
      if (open) open.health.deleted = true;
      this.#lastDetached.delete(row.id);
      this.#traffic.forget(row.id);
      await rm(this.#path(name), { force: true });
      await fsyncDir(this.#dir);
      this.#logger.info({ volume: name, ...(inUse ? { forcedWhile: inUse } : {}) }, 'volume deleted');
    });
  }

  /** Why a volume must not be deleted without force, or undefined if nothing uses it. */
  #whyInUse(row: VolumeRow): string | undefined {
    const { attachments } = this.#toVolume(row);
    if (attachments.length > 0) return `has clients (${attachments.join(', ')}); detach them first`;
    const lease = this.leases.get(row.name);
    if (lease?.holder) return `has a writer (lease generation ${lease.generation}): a VM may still run on it; stop it and release the lease first`;
    const detachedAt = this.#lastDetached.get(row.id);
    const sinceMs = detachedAt === undefined ? Infinity : Date.now() - detachedAt;
    if (sinceMs < reconnectWindowMs) {
      return `lost a client ${(sinceMs / 1000).toFixed(1)} s ago, and QEMU reconnects for up to ${reconnectWindowMs / 1000} s; try again once that has passed`;
    }
    return undefined;
  }

  /** Moves a volume's writer lease to `holder` (see writer-leases.ts); resolves once the old writer's writes have finished. */
  async grantWriter(name: string, holder: string): Promise<{ holder: string; generation: number; grantedAt: number }> {
    this.get(name);
    const lease = await this.leases.grant(name, holder);
    return { holder, generation: lease.generation, grantedAt: lease.grantedAt };
  }

  /** Drops a volume's writer lease if `holder` still holds it; the volume stays fenced until the next grant. */
  async releaseWriter(name: string, holder: string): Promise<{ released: boolean; writer: PublicLease | null }> {
    this.get(name);
    const released = await this.leases.release(name, holder);
    return { released, writer: this.get(name).writer };
  }

  listQuarantine(): Promise<QuarantinedFile[]> {
    return this.quarantine.list();
  }

  /** Makes a quarantined file a (writable) volume of its name again, with the file's size. */
  restore(name: string): Promise<Volume> {
    return this.#changes.run(name, async () => {
      const { path, sizeBytes } = await this.quarantine.file(name);
      if (this.#row(name)) throw new VmferryError('VMF_VOLUME_EXISTS', `volume "${name}" already exists; it cannot be restored over`);
      if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 512 || sizeBytes > maxVolumeBytes || sizeBytes % 512 !== 0) {
        throw new VmferryError('VMF_INVALID_ARGUMENT', `quarantined "${name}" is ${sizeBytes} bytes, not a volume size (a multiple of 512 bytes from 512 B to 1 PiB); purge it or fix it by hand`);
      }
      if (await stat(this.#path(name)).catch(() => undefined)) {
        throw new VmferryError('VMF_CONFLICT', `${this.#path(name)} exists; move it away before restoring "${name}"`);
      }
      await rename(path, this.#path(name));
      await fsyncDir(this.#dir);
      await fsyncDir(this.quarantine.dir);
      this.#insert(name, sizeBytes, false);
      this.#logger.warn({ volume: name, sizeBytes }, 'volume restored from quarantine');
      return this.get(name);
    });
  }

  async purge(name: string): Promise<void> {
    await this.quarantine.purge(name);
    this.#logger.warn({ file: name }, 'quarantined file purged');
  }

  async open(exportName: string, client: string): Promise<NbdBackend | undefined> {
    if (!this.#resolveExport(exportName)) return undefined;
    const { volume: name, token } = parseExportName(exportName);
    // Attached before anything is awaited, so a delete queued behind this open sees the client.
    this.#db.prepare('INSERT OR REPLACE INTO attachments (volume, client, since) VALUES (?, ?, ?)').run(name, client, Date.now());
    let backend: NbdBackend | undefined;
    try {
      backend = await this.#changes.run(name, () => this.#openFile(name, token, client));
    } finally {
      if (!backend) this.#db.prepare('DELETE FROM attachments WHERE volume = ? AND client = ?').run(name, client);
    }
    return backend;
  }

  async #openFile(name: string, token: string | undefined, client: string): Promise<NbdBackend | undefined> {
    // The volume may have been deleted (or deleted and created again) while this open waited its turn.
    const row = this.#row(name);
    if (!row) return undefined;
    let entry = this.#files.get(row.id);
    if (!entry) {
      entry = { file: await open(this.#path(name), 'r+'), health: new VolumeHealth(), users: 0 };
      this.#files.set(row.id, entry);
    }
    entry.users++;
    this.#connections.set(client, { name, id: row.id });
    // Again: a forced delete while this open waited took the first one with it, and this may be a new volume of that name.
    this.#db.prepare('INSERT OR REPLACE INTO attachments (volume, client, since) VALUES (?, ?, ?)').run(name, client, Date.now());
    const file = new FileBackend(entry.file, row.size_bytes, this.#helper, this.#cachedRead);
    const backend = new StickyErrorBackend(this.#options.fileLayer ? this.#options.fileLayer(file, name) : file, entry.health);
    // Outermost: a request refused (read-only, fenced) or failed moved no data, so it is not counted.
    return this.#traffic.connect(row.id, client, row.read_only ? new ReadOnlyBackend(backend) : new FencedBackend(backend, this.leases, name, token));
  }

  /** Each volume's request and data counters, connections and writer lease, for GET /metrics (metrics.ts). */
  metrics(): VolumeMetrics[] {
    const rows = this.#db.prepare('SELECT * FROM volumes ORDER BY name').all() as VolumeRow[];
    return rows.map((row) => ({ name: row.name, traffic: this.#traffic.traffic(row.id), writer: this.#toVolume(row).writer }));
  }

  /** Bytes the volume's NBD clients read and wrote, in all and per connection (traffic.ts). */
  stats(name: string): VolumeStats {
    const row = this.#row(name);
    if (!row) throw new VmferryError('VMF_VOLUME_NOT_FOUND', `no volume named "${name}"`);
    return this.#traffic.stats(row.id, name);
  }

  release(_exportName: string, client: string): void {
    const connection = this.#connections.get(client);
    if (!connection) return;
    this.#connections.delete(client);
    this.#traffic.disconnect(connection.id, client);
    if (!this.#stopping) this.#db.prepare('DELETE FROM attachments WHERE volume = ? AND client = ?').run(connection.name, client);
    this.#lastDetached.set(connection.id, Date.now());
    const entry = this.#files.get(connection.id);
    if (!entry) return;
    entry.users--;
    if (entry.users === 0) {
      this.#files.delete(connection.id);
      entry.file.close().catch((err: unknown) => this.#logger.error({ err, volume: connection.name }, 'closing volume file failed'));
    }
  }

  /** Called before the NBD clients are drained at shutdown, so the next start knows which volumes they will reconnect to. */
  stopping(): void {
    this.#stopping = true;
  }

  async close(): Promise<void> {
    for (const entry of this.#files.values()) {
      await entry.file.datasync();
      await entry.file.close();
    }
    this.#files.clear();
    this.#helper?.close();
    this.#db.close();
  }

  #row(name: string): VolumeRow | undefined {
    return this.#db.prepare('SELECT * FROM volumes WHERE name = ?').get(name) as VolumeRow | undefined;
  }

  #insert(name: string, sizeBytes: number, readOnly: boolean): void {
    this.#db.prepare('INSERT INTO volumes (id, name, size_bytes, read_only, created_at) VALUES (?, ?, ?, ?, ?)').run(randomUUID(), name, sizeBytes, readOnly ? 1 : 0, Date.now());
  }

  /** The volume an export name designates; undefined for no volume or a malformed token. */
  #resolveExport(exportName: string): VolumeRow | undefined {
    const { volume, token } = parseExportName(exportName);
    if (token !== undefined && !writerTokenPattern.test(token)) return undefined;
    return this.#row(volume);
  }

  #toVolume(row: VolumeRow): Volume {
    const attachments = (this.#db.prepare('SELECT client FROM attachments WHERE volume = ? ORDER BY since').all(row.name) as { client: string }[]).map((a) => a.client);
    const lease = this.leases.get(row.name);
    return {
      name: row.name,
      sizeBytes: row.size_bytes,
      readOnly: row.read_only === 1,
      createdAt: row.created_at,
      attachments,
      writer: lease ? publicLease(lease) : null,
      lastDetachedAt: this.#lastDetached.get(row.id) ?? null,
    };
  }

  #path(name: string): string {
    return join(this.#dir, `${name}.raw`);
  }

  /** Files without a catalog row: an interrupted creation, or a catalog older than its volumes. Kept, out of the way. */
  async #quarantineOrphans(): Promise<void> {
    const known = new Set(this.volumes().map((v) => `${v.name}.raw`));
    const orphans = (await readdir(this.#dir)).filter((file) => !known.has(file));
    for (const file of orphans) {
      let name: string;
      try {
        name = await this.quarantine.admit(join(this.#dir, file), file);
      } catch (err) {
        throw new VmferryError('VMF_INTERNAL', `cannot move ${join(this.#dir, file)}, which has no catalog entry, to ${this.quarantine.dir}: ${(err as Error).message}; move it away by hand`, { cause: err });
      }
      this.#logger.warn({ file, quarantined: name, dir: this.quarantine.dir }, 'a volume file with no catalog entry was moved to quarantine (see vmferry volume quarantine list)');
    }
    if (orphans.length > 0) await fsyncDir(this.#dir);
  }
}

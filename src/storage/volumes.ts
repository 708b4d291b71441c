/**
 * The storage server's volumes: sparse raw files in DATA/volumes, described by
 * a SQLite catalog (name, size, read-only, created, current attachments).
 * A volume exists once its catalog row does; the file is made durable first,
 * so a crash never leaves a row without its file. Also the NBD server's
 * ExportProvider: an export's name is its volume's name, optionally followed
 * by `@TOKEN`, the client's name for the one-writer fence (writer-leases.ts).
 */
import Database from 'better-sqlite3';
import { mkdir, open, readdir, rm, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { VmferryError } from '../errors.ts';
import type { ExportInfo, ExportProvider, NbdBackend } from '../nbd/backend.ts';
import { FsHelper } from './fs-helper.ts';
import { FencedBackend, FileBackend, ReadOnlyBackend } from './volume-backends.ts';
import { WriterLeases, parseExportName, writerTokenPattern, type WriterLease } from './writer-leases.ts';

export interface Volume {
  name: string;
  sizeBytes: number;
  readOnly: boolean;
  createdAt: number;
  /** Clients attached right now (host:port of each NBD connection, and its writer token if it gave one). */
  attachments: string[];
  /** Who may write, once a writer was granted; until then every client may. */
  writer: WriterLease | null;
}

interface VolumeRow {
  name: string;
  size_bytes: number;
  read_only: number;
  created_at: number;
}

export const volumeNamePattern = /^[a-z0-9][a-z0-9._-]{0,62}$/;
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
  readonly leases: WriterLeases;
  /** One open file per volume, shared by its connections; the promise is stored at once so concurrent opens share it. */
  readonly #files = new Map<string, { file: Promise<FileHandle>; users: number }>();
  /**
   * Names whose file is being created or deleted. A creation's catalog row comes last and a
   * deletion's goes first, so the catalog alone cannot keep concurrent requests for a name apart.
   */
  readonly #changing = new Map<string, 'creating' | 'deleting'>();

  private constructor(db: Database.Database, dir: string, logger: Logger, helper: FsHelper | undefined) {
    this.#db = db;
    this.#dir = dir;
    this.#logger = logger;
    this.#helper = helper;
    this.leases = new WriterLeases(db);
  }

  static async open(dataDir: string, logger: Logger): Promise<VolumeService> {
    const dir = join(dataDir, 'volumes');
    await mkdir(dir, { recursive: true });
    const db = new Database(join(dataDir, 'catalog.db'));
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.exec(`
      CREATE TABLE IF NOT EXISTS volumes (name TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, read_only INTEGER NOT NULL, created_at INTEGER NOT NULL);
      CREATE TABLE IF NOT EXISTS attachments (volume TEXT NOT NULL, client TEXT NOT NULL, since INTEGER NOT NULL, PRIMARY KEY (volume, client));
      DELETE FROM attachments;
    `);
    const service = new VolumeService(db, dir, logger, await FsHelper.start(logger));
    await service.#removeOrphanFiles();
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
    const row = this.#db.prepare('SELECT * FROM volumes WHERE name = ?').get(name) as VolumeRow | undefined;
    if (!row) throw new VmferryError('VMF_VOLUME_NOT_FOUND', `no volume named "${name}"`);
    return this.#toVolume(row);
  }

  async create(name: string, sizeBytes: number, readOnly = false): Promise<Volume> {
    if (!volumeNamePattern.test(name)) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid volume name "${name}": 1-63 characters of a-z, 0-9, '.', '-', '_', starting with a letter or digit`);
    }
    checkVolumeSize(sizeBytes);
    const change = this.#changing.get(name);
    if (change === 'creating') throw new VmferryError('VMF_VOLUME_EXISTS', `volume "${name}" is being created by another request`);
    if (change === 'deleting') throw new VmferryError('VMF_CONFLICT', `volume "${name}" is being deleted; create it again once that is done`);
    if (this.#db.prepare('SELECT 1 FROM volumes WHERE name = ?').get(name)) {
      throw new VmferryError('VMF_VOLUME_EXISTS', `volume "${name}" already exists`);
    }
    this.#changing.set(name, 'creating');
    try {
      await this.#createFile(name, sizeBytes);
      this.#db.prepare('INSERT INTO volumes (name, size_bytes, read_only, created_at) VALUES (?, ?, ?, ?)').run(name, sizeBytes, readOnly ? 1 : 0, Date.now());
    } finally {
      this.#changing.delete(name);
    }
    this.#logger.info({ volume: name, sizeBytes, readOnly }, 'volume created');
    return this.get(name);
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
      await this.#syncDir();
    } catch (err) {
      await rm(path, { force: true });
      throw err;
    }
  }

  async resize(name: string, sizeBytes: number): Promise<Volume> {
    const volume = this.get(name);
    checkVolumeSize(sizeBytes);
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
  }

  async remove(name: string): Promise<void> {
    const volume = this.get(name);
    if (volume.attachments.length > 0) {
      throw new VmferryError('VMF_CONFLICT', `volume "${name}" has clients (${volume.attachments.join(', ')}); detach them first`);
    }
    this.#db.prepare('DELETE FROM volumes WHERE name = ?').run(name);
    this.leases.forget(name);
    this.#changing.set(name, 'deleting');
    try {
      await rm(this.#path(name), { force: true });
      await this.#syncDir();
    } finally {
      this.#changing.delete(name);
    }
    this.#logger.info({ volume: name }, 'volume deleted');
  }

  /** Moves a volume's writer lease (see writer-leases.ts); resolves once the old writer's writes have finished. */
  grantWriter(name: string, holder: string, generation: number): Promise<WriterLease> {
    this.get(name);
    return this.leases.grant(name, holder, generation);
  }

  async open(exportName: string, client: string): Promise<NbdBackend | undefined> {
    const resolved = this.#resolveExport(exportName);
    if (!resolved) return undefined;
    const { row, token } = resolved;
    const name = row.name;
    let entry = this.#files.get(name);
    if (!entry) {
      entry = { file: open(this.#path(name), 'r+'), users: 0 };
      this.#files.set(name, entry);
    }
    entry.users++;
    let file: FileHandle;
    try {
      file = await entry.file;
    } catch (err) {
      this.release(name, client);
      throw err;
    }
    this.#db.prepare('INSERT OR REPLACE INTO attachments (volume, client, since) VALUES (?, ?, ?)').run(name, attachmentName(client, token), Date.now());
    const backend = new FileBackend(file, row.size_bytes, this.#path(name), this.#helper);
    return row.read_only ? new ReadOnlyBackend(backend) : new FencedBackend(backend, this.leases, name, token);
  }

  release(exportName: string, client: string): void {
    const { volume: name, token } = parseExportName(exportName);
    this.#db.prepare('DELETE FROM attachments WHERE volume = ? AND client = ?').run(name, attachmentName(client, token));
    const entry = this.#files.get(name);
    if (!entry) return;
    entry.users--;
    if (entry.users === 0) {
      this.#files.delete(name);
      entry.file.then((file) => file.close()).catch((err: unknown) => this.#logger.error({ err, volume: name }, 'closing volume file failed'));
    }
  }

  async close(): Promise<void> {
    for (const entry of this.#files.values()) {
      const file = await entry.file;
      await file.datasync();
      await file.close();
    }
    this.#files.clear();
    this.#helper?.close();
    this.#db.close();
  }

  /** The volume an export name designates and the writer token it carries; undefined for no volume or a malformed token. */
  #resolveExport(exportName: string): { row: VolumeRow; token: string | undefined } | undefined {
    const { volume, token } = parseExportName(exportName);
    if (token !== undefined && !writerTokenPattern.test(token)) return undefined;
    const row = this.#db.prepare('SELECT * FROM volumes WHERE name = ?').get(volume) as VolumeRow | undefined;
    return row ? { row, token } : undefined;
  }

  #toVolume(row: VolumeRow): Volume {
    const attachments = (this.#db.prepare('SELECT client FROM attachments WHERE volume = ? ORDER BY since').all(row.name) as { client: string }[]).map((a) => a.client);
    return { name: row.name, sizeBytes: row.size_bytes, readOnly: row.read_only === 1, createdAt: row.created_at, attachments, writer: this.leases.get(row.name) ?? null };
  }

  #path(name: string): string {
    return join(this.#dir, `${name}.raw`);
  }

  async #syncDir(): Promise<void> {
    const dir = await open(this.#dir, 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }

  /** Files without a catalog row are creations a crash interrupted: they never existed. */
  async #removeOrphanFiles(): Promise<void> {
    const known = new Set(this.volumes().map((v) => `${v.name}.raw`));
    for (const file of await readdir(this.#dir)) {
      if (!known.has(file)) {
        this.#logger.warn({ file }, 'removing a volume file with no catalog entry (interrupted creation)');
        await rm(join(this.#dir, file), { force: true });
      }
    }
  }
}

function attachmentName(client: string, token: string | undefined): string {
  return token === undefined ? client : `${client} (${token})`;
}

/**
 * What the storage server saw of each re-attached disk during a migration. A
 * re-attached disk has no copy job, so its figure is the storage server's
 * count of the bytes its clients (the guest, through QEMU on either host) read
 * and wrote to the volume, read before the first attempt and after the last.
 */
import type { Logger } from 'pino';
import { describeError } from '../errors.ts';
import { requestJson } from '../http/errors.ts';
import type { MigrationReport, StorageIo } from '../migration/phases.ts';
import type { MigrationPlan } from '../migration/plan.ts';
import type { VmSpec } from '../qemu/spec.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import type { VolumeStats } from '../storage/traffic.ts';
import { parseExportName } from '../storage/writer-leases.ts';

/** The storage server's admin API, and the identity the controller shows it. */
export interface StorageServerAccess {
  url: string;
  tls?: TlsIdentity;
}

type Reading = { stats: VolumeStats } | { why: string };

const readTimeoutMs = 5_000;

export class StorageIoWatch {
  readonly #storage: StorageServerAccess | undefined;
  /** Re-attached disk id → its volume. */
  readonly #volumes: Map<string, string>;
  readonly #before: Map<string, Reading>;
  readonly #logger: Logger;

  private constructor(storage: StorageServerAccess | undefined, volumes: Map<string, string>, before: Map<string, Reading>, logger: Logger) {
    this.#storage = storage;
    this.#volumes = volumes;
    this.#before = before;
    this.#logger = logger;
  }

  /** Reads the counters of every re-attached disk's volume; call before the first attempt. */
  static async start(storage: StorageServerAccess | undefined, spec: VmSpec, plan: MigrationPlan, logger: Logger): Promise<StorageIoWatch> {
    const volumes = new Map<string, string>();
    for (const disk of plan.disks.filter((d) => d.operation === 'reattach')) {
      const source = spec.disks.find((d) => d.id === disk.id)?.source;
      if (source?.kind === 'nbd') volumes.set(disk.id, parseExportName(source.export).volume);
    }
    const watch = new StorageIoWatch(storage, volumes, new Map(), logger);
    for (const [diskId, reading] of await watch.#readAll()) watch.#before.set(diskId, reading);
    return watch;
  }

  /** The report with `storageIo` on each re-attached disk: the counters now less those read at start, or why there is no figure. */
  async finish(report: MigrationReport): Promise<MigrationReport> {
    if (this.#volumes.size === 0) return report;
    const after = await this.#readAll();
    const disks = report.disks.map((disk) => {
      const before = this.#before.get(disk.id);
      const now = after.get(disk.id);
      return before && now ? { ...disk, storageIo: difference(before, now) } : disk;
    });
    return { ...report, disks };
  }

  async #readAll(): Promise<Map<string, Reading>> {
    const storage = this.#storage;
    const readings = await Promise.all(
      [...this.#volumes].map(async ([diskId, volume]): Promise<[string, Reading]> => {
        if (!storage) return [diskId, { why: 'the controller was started without --storage, so it cannot ask the storage server' }];
        try {
          const path = `/v1/volumes/${encodeURIComponent(volume)}/stats`;
          return [diskId, { stats: await requestJson<VolumeStats>(storage.url, 'GET', path, { timeoutMs: readTimeoutMs, tls: storage.tls, server: { role: 'storage' } }) }];
        } catch (err) {
          this.#logger.warn({ err: describeError(err), volume }, 'could not read the storage server\'s counters of a re-attached disk');
          return [diskId, { why: `the storage server did not say (${describeError(err)})` }];
        }
      }),
    );
    return new Map(readings);
  }
}

function difference(before: Reading, after: Reading): StorageIo {
  if ('why' in before) return { measured: false, why: before.why };
  if ('why' in after) return { measured: false, why: after.why };
  if (before.stats.countingSince !== after.stats.countingSince) {
    return { measured: false, why: 'the storage server restarted (or the volume was created again) during the migration, and its counters started again' };
  }
  return { measured: true, bytesRead: after.stats.bytesRead - before.stats.bytesRead, bytesWritten: after.stats.bytesWritten - before.stats.bytesWritten };
}

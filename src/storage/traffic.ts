/**
 * What the storage server's NBD clients read from and wrote to each volume,
 * per volume and per connection: plain counters, bumped by a backend layer
 * once a request has succeeded, so the transmission path pays a few additions.
 * Bytes of data only (READ replies, WRITE payloads): zeroing and trimming
 * carry no data and are not counted. Per volume also every request by
 * operation and result, and the time each took in the backend (GET /metrics). In memory: a volume's counters start
 * when the server starts or the volume is created (`countingSince`), so a
 * reader compares two readings only when that did not change between them.
 */
import { Type, type Static } from '@sinclair/typebox';
import type { Extent, NbdBackend } from '../nbd/backend.ts';
import { bucketIndex, type BucketCounts } from '../http/prometheus.ts';

const Bytes = Type.Integer({ minimum: 0 });
/** Closed connections kept per volume: enough to see a migration's source and destination, bounded against reconnect storms. */
const closedKept = 16;

export const VolumeStatsSchema = Type.Object({
  volume: Type.String(),
  countingSince: Type.Integer({ description: 'when these counters started (ms since the epoch): the server\'s start or the volume\'s creation; two readings with different values cannot be compared' }),
  bytesRead: Type.Integer({ minimum: 0, description: 'data bytes read by every client since countingSince' }),
  bytesWritten: Type.Integer({ minimum: 0, description: 'data bytes written (WRITE payloads) by every client since countingSince; zeroing and trimming are not counted' }),
  connections: Type.Array(
    Type.Object({
      client: Type.String({ description: 'the NBD connection: host:port of its client' }),
      connectedAt: Type.Integer(),
      disconnectedAt: Type.Union([Type.Integer(), Type.Null()]),
      bytesRead: Bytes,
      bytesWritten: Bytes,
    }),
    { description: `the open connections, then up to ${closedKept} closed ones, the latest first` },
  ),
});
export type VolumeStats = Static<typeof VolumeStatsSchema>;

export interface IoCounts {
  bytesRead: number;
  bytesWritten: number;
}

type ConnectionCounts = VolumeStats['connections'][number];

export const nbdOperations = ['read', 'write', 'write_zeroes', 'trim', 'flush', 'block_status'] as const;
export type NbdOperation = (typeof nbdOperations)[number];

/** Seconds a request spends in the backend: a page-cache read takes microseconds, a flush to a busy disk up to seconds. */
export const requestSecondsBounds = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];

/** A volume's requests: by operation, those that succeeded and those that failed (refused by the fence or read-only, or an I/O error); their times. */
export interface RequestCounts {
  ok: Record<NbdOperation, number>;
  failed: Record<NbdOperation, number>;
  seconds: BucketCounts;
}

interface VolumeCounters {
  countingSince: number;
  totals: IoCounts;
  requests: { ok: Record<NbdOperation, number>; failed: Record<NbdOperation, number>; seconds: { counts: number[]; sum: number; count: number } };
  open: ConnectionCounts[];
  closed: ConnectionCounts[];
}

/** What GET /metrics shows of one volume. */
export interface VolumeTraffic {
  countingSince: number;
  totals: IoCounts;
  requests: RequestCounts;
  openConnections: number;
}

function perOperation(): Record<NbdOperation, number> {
  return { read: 0, write: 0, write_zeroes: 0, trim: 0, flush: 0, block_status: 0 };
}

/** The counters of every volume, by the volume's id (a volume created again under an old name starts from zero). */
export class TrafficCounters {
  readonly #volumes = new Map<string, VolumeCounters>();

  /** A new connection to volume `id`: the counting layer to put over its backend. */
  connect(id: string, client: string, backend: NbdBackend): NbdBackend {
    const volume = this.#volume(id);
    const connection: ConnectionCounts = { client, connectedAt: Date.now(), disconnectedAt: null, bytesRead: 0, bytesWritten: 0 };
    volume.open.push(connection);
    return new CountingBackend(backend, volume, connection);
  }

  disconnect(id: string, client: string): void {
    const volume = this.#volumes.get(id);
    const index = volume?.open.findIndex((c) => c.client === client) ?? -1;
    if (!volume || index < 0) return;
    const [connection] = volume.open.splice(index, 1);
    if (!connection) return;
    connection.disconnectedAt = Date.now();
    volume.closed.unshift(connection);
    volume.closed.length = Math.min(volume.closed.length, closedKept);
  }

  stats(id: string, name: string): VolumeStats {
    const { countingSince, totals, open, closed } = this.#volume(id);
    return { volume: name, countingSince, ...totals, connections: [...open, ...closed].map((c) => ({ ...c })) };
  }

  /** The volume's counters for GET /metrics, copied. */
  traffic(id: string): VolumeTraffic {
    const { countingSince, totals, requests, open } = this.#volume(id);
    return {
      countingSince,
      totals: { ...totals },
      requests: { ok: { ...requests.ok }, failed: { ...requests.failed }, seconds: { ...requests.seconds, counts: [...requests.seconds.counts] } },
      openConnections: open.length,
    };
  }

  /** The volume was deleted. */
  forget(id: string): void {
    this.#volumes.delete(id);
  }

  #volume(id: string): VolumeCounters {
    let volume = this.#volumes.get(id);
    if (!volume) {
      volume = {
        countingSince: Date.now(),
        totals: { bytesRead: 0, bytesWritten: 0 },
        requests: { ok: perOperation(), failed: perOperation(), seconds: { counts: requestSecondsBounds.map(() => 0), sum: 0, count: 0 } },
        open: [],
        closed: [],
      };
      this.#volumes.set(id, volume);
    }
    return volume;
  }
}

/** Counts every request and its time, and the data of successful reads and writes, into the volume's and the connection's counters. */
class CountingBackend implements NbdBackend {
  readonly #next: NbdBackend;
  readonly #volume: VolumeCounters;
  readonly #connection: IoCounts;

  constructor(next: NbdBackend, volume: VolumeCounters, connection: IoCounts) {
    this.#next = next;
    this.#volume = volume;
    this.#connection = connection;
  }

  get size(): number {
    return this.#next.size;
  }

  get readOnly(): boolean {
    return this.#next.readOnly;
  }

  // One reaction per request, as before the metrics: the 4k path pays no extra promise (issue 20).
  read(offset: number, target: Buffer): Promise<void> {
    const started = performance.now();
    return this.#next.read(offset, target).then(
      () => {
        this.#settled('read', true, started);
        this.#volume.totals.bytesRead += target.length;
        this.#connection.bytesRead += target.length;
      },
      (err: unknown) => this.#failed('read', started, err),
    );
  }

  write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void> {
    const started = performance.now();
    return this.#next.write(offset, data, fua).then(
      () => {
        this.#settled('write', true, started);
        let length = 0;
        for (const piece of data) length += piece.length;
        this.#volume.totals.bytesWritten += length;
        this.#connection.bytesWritten += length;
      },
      (err: unknown) => this.#failed('write', started, err),
    );
  }

  writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    return this.#counted('write_zeroes', performance.now(), this.#next.writeZeroes(offset, length, fua, noHole));
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#counted('trim', performance.now(), this.#next.trim(offset, length, fua));
  }

  flush(): Promise<void> {
    return this.#counted('flush', performance.now(), this.#next.flush());
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#counted('block_status', performance.now(), this.#next.blockStatus(offset, length));
  }

  #counted<T>(operation: NbdOperation, started: number, request: Promise<T>): Promise<T> {
    return request.then(
      (value) => {
        this.#settled(operation, true, started);
        return value;
      },
      (err: unknown) => this.#failed(operation, started, err),
    );
  }

  #failed(operation: NbdOperation, started: number, err: unknown): never {
    this.#settled(operation, false, started);
    throw err;
  }

  /** Counts a request by its result, and the time from `started` until it settled. */
  #settled(operation: NbdOperation, ok: boolean, started: number): void {
    const { requests } = this.#volume;
    requests[ok ? 'ok' : 'failed'][operation]++;
    const seconds = (performance.now() - started) / 1000;
    const index = bucketIndex(requestSecondsBounds, seconds);
    if (index < requests.seconds.counts.length) requests.seconds.counts[index] = (requests.seconds.counts[index] ?? 0) + 1;
    requests.seconds.sum += seconds;
    requests.seconds.count++;
  }
}

/**
 * What the storage server's NBD clients read from and wrote to each volume,
 * per volume and per connection: plain counters, bumped by a backend layer
 * once a request has succeeded, so the transmission path pays two additions.
 * Bytes of data only (READ replies, WRITE payloads): zeroing and trimming
 * carry no data and are not counted. In memory: a volume's counters start
 * when the server starts or the volume is created (`countingSince`), so a
 * reader compares two readings only when that did not change between them.
 */
import { Type, type Static } from '@sinclair/typebox';
import type { Extent, NbdBackend } from '../nbd/backend.ts';

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

interface VolumeCounters {
  countingSince: number;
  totals: IoCounts;
  open: ConnectionCounts[];
  closed: ConnectionCounts[];
}

/** The counters of every volume, by the volume's id (a volume created again under an old name starts from zero). */
export class TrafficCounters {
  readonly #volumes = new Map<string, VolumeCounters>();

  /** A new connection to volume `id`: the counting layer to put over its backend. */
  connect(id: string, client: string, backend: NbdBackend): NbdBackend {
    const volume = this.#volume(id);
    const connection: ConnectionCounts = { client, connectedAt: Date.now(), disconnectedAt: null, bytesRead: 0, bytesWritten: 0 };
    volume.open.push(connection);
    return new CountingBackend(backend, volume.totals, connection);
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

  /** The volume was deleted. */
  forget(id: string): void {
    this.#volumes.delete(id);
  }

  #volume(id: string): VolumeCounters {
    let volume = this.#volumes.get(id);
    if (!volume) {
      volume = { countingSince: Date.now(), totals: { bytesRead: 0, bytesWritten: 0 }, open: [], closed: [] };
      this.#volumes.set(id, volume);
    }
    return volume;
  }
}

/** Counts the data of successful reads and writes into the volume's and the connection's counters. */
class CountingBackend implements NbdBackend {
  readonly #next: NbdBackend;
  readonly #volume: IoCounts;
  readonly #connection: IoCounts;

  constructor(next: NbdBackend, volume: IoCounts, connection: IoCounts) {
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

  read(offset: number, length: number): Promise<Buffer> {
    return this.#next.read(offset, length).then((data) => {
      this.#volume.bytesRead += length;
      this.#connection.bytesRead += length;
      return data;
    });
  }

  async write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void> {
    await this.#next.write(offset, data, fua);
    let length = 0;
    for (const piece of data) length += piece.length;
    this.#volume.bytesWritten += length;
    this.#connection.bytesWritten += length;
  }

  writeZeroes(offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    return this.#next.writeZeroes(offset, length, fua, noHole);
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#next.trim(offset, length, fua);
  }

  flush(): Promise<void> {
    return this.#next.flush();
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#next.blockStatus(offset, length);
  }
}

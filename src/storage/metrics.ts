/**
 * GET /metrics of the storage server, for Prometheus: per volume (by name),
 * its NBD requests by operation and result, the time they took, the bytes of
 * data read and written (traffic.ts), its open connections and its writer
 * lease. The counters live in memory from the server's start or the volume's
 * creation, so a restart shows as a counter reset, which Prometheus expects.
 */
import { Exposition } from '../http/prometheus.ts';
import { vmferryVersion } from '../version.ts';
import { nbdOperations, requestSecondsBounds, type VolumeTraffic } from './traffic.ts';
import type { PublicLease } from './writer-leases.ts';

export interface VolumeMetrics {
  name: string;
  traffic: VolumeTraffic;
  /** null until the volume's first grant (until then every client may write). */
  writer: PublicLease | null;
}

export function renderStorageMetrics(volumes: readonly VolumeMetrics[], nbdConnections: number): string {
  const out = new Exposition();
  out.metric('vmferry_storage_build_info', 'gauge', 'The storage server\'s version (always 1).', [[{ version: vmferryVersion }, 1]]);
  out.metric('vmferry_storage_volumes', 'gauge', 'Volumes the server holds.', [[{}, volumes.length]]);
  out.metric('vmferry_storage_nbd_connections', 'gauge', 'Open NBD connections, to any export.', [[{}, nbdConnections]]);
  out.metric('vmferry_storage_nbd_volume_connections', 'gauge', 'Open NBD connections to each volume.', volumes.map((v) => [{ volume: v.name }, v.traffic.openConnections]));
  out.metric(
    'vmferry_storage_nbd_requests_total',
    'counter',
    'NBD requests that reached a volume, by operation and result (failed: refused by the writer fence or read-only, or an I/O error).',
    volumes.flatMap((v) => nbdOperations.flatMap((op) => (['ok', 'failed'] as const).map((result) => [{ volume: v.name, op, result }, v.traffic.requests[result][op]] as const))),
  );
  out.bucketedHistogram(
    'vmferry_storage_nbd_request_duration_seconds',
    'Time NBD requests spent in the volume\'s backend (file or Ceph), every operation, from the call to its result.',
    requestSecondsBounds,
    volumes.map((v) => [{ volume: v.name }, v.traffic.requests.seconds]),
  );
  out.metric(
    'vmferry_storage_nbd_bytes_total',
    'counter',
    'Data bytes the volume\'s clients read (READ replies) and wrote (WRITE payloads); zeroing and trimming carry none.',
    volumes.flatMap((v) => [
      [{ volume: v.name, direction: 'read' }, v.traffic.totals.bytesRead],
      [{ volume: v.name, direction: 'write' }, v.traffic.totals.bytesWritten],
    ]),
  );
  const leased = volumes.flatMap((v) => (v.writer ? [{ name: v.name, lease: v.writer }] : []));
  out.metric('vmferry_storage_writer_lease_held', 'gauge', 'Whether the volume\'s writer lease has a holder (1) or was released (0); volumes never granted one are left out.', leased.map((v) => [{ volume: v.name }, v.lease.held ? 1 : 0]));
  out.metric('vmferry_storage_writer_lease_generation', 'gauge', 'The generation of the volume\'s writer lease: it grows by one at each grant (a migration\'s switch-over moves it).', leased.map((v) => [{ volume: v.name }, v.lease.generation]));
  return out.text();
}

/**
 * GET /metrics: the controller's figures in Prometheus' text exposition
 * format (http/prometheus.ts), computed at each scrape from what the store holds:
 * the report of every finished migration, the unfinished records, the hosts'
 * heartbeats. Nothing is counted in memory, so a restarted controller, or
 * another controller on the same PostgreSQL database, answers the same
 * figures, and a figure is never a default: a migration without a report
 * (or a report without a measured pause) adds nothing to it.
 */
import { finalPhases, type MigrationReport } from '../migration/phases.ts';
import type { MigrationRecord } from '../store/store.ts';
import { vmferryVersion } from '../version.ts';
import type { HostStatus } from './inventory.ts';
import { Exposition } from '../http/prometheus.ts';

const outcomes: readonly MigrationReport['outcome'][] = ['completed', 'cancelled', 'failed', 'unresolved'];
/** Seconds; from a small guest on a quiet link to a large one throttled hard. */
const durationBuckets = [1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600];
/** Seconds; around the default 300 ms downtime limit, up to a stop-and-copy's pause. */
const pauseBuckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export function renderMetrics(migrations: readonly MigrationRecord[], hosts: readonly HostStatus[]): string {
  const reports = migrations.flatMap((m) => (m.report && finalPhases.includes(m.phase) ? [m.report] : []));
  const out = new Exposition();
  out.metric('vmferry_build_info', 'gauge', 'The controller\'s version (always 1).', [[{ version: vmferryVersion }, 1]]);
  out.metric('vmferry_migrations_total', 'counter', 'Finished migrations, by the outcome in their report.', outcomes.map((outcome) => [{ outcome }, reports.filter((r) => r.outcome === outcome).length]));
  out.metric('vmferry_migrations_running', 'gauge', 'Migrations not yet in a final phase (in the store: any controller\'s).', [[{}, migrations.filter((m) => !finalPhases.includes(m.phase)).length]]);
  out.histogram('vmferry_migration_duration_seconds', 'Whole migrations, every attempt, from their reports.', durationBuckets, reports.map((r) => r.totalMs / 1000));
  out.histogram(
    'vmferry_migration_pause_seconds',
    'The guest\'s pause in a migration\'s last attempt (source STOP to RESUME), where its report measured one.',
    pauseBuckets,
    reports.flatMap((r) => (r.pauseMs === undefined ? [] : [r.pauseMs / 1000])),
  );
  out.metric('vmferry_migration_ram_bytes_total', 'counter', 'Guest RAM sent by finished migrations, every attempt.', [[{}, sum(reports.map(ramBytes))]]);
  out.metric('vmferry_migration_mirror_bytes_total', 'counter', 'Local disk bytes the mirrors of finished migrations copied, every attempt.', [[{}, sum(reports.map(mirrorBytes))]]);
  out.metric('vmferry_hosts', 'gauge', 'Hosts the controller knows, by whether their agent heartbeats.', (['reachable', 'unreachable'] as const).map((state) => [{ state }, hosts.filter((h) => h.state === state).length]));
  return out.text();
}

function ramBytes(report: MigrationReport): number {
  return report.allAttempts?.ramBytes ?? report.ram.transferredBytes;
}

function mirrorBytes(report: MigrationReport): number {
  return report.allAttempts?.diskBytes ?? sum(report.disks.map((d) => d.bytesSent));
}

function sum(values: readonly number[]): number {
  return values.reduce((a, b) => a + b, 0);
}

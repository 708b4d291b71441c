/**
 * What one GET /metrics costs the controller as its store grows: it reads
 * every migration record at each scrape (src/controller/metrics.ts), in the
 * controller's event loop. Fills a SQLite store with completed migrations
 * shaped like real reports, then times the scrape's work (listing and
 * rendering) several times. Starts no QEMU.
 *
 *   node --import tsx bench/metrics-scrape.ts [--migrations 1000,10000] [--runs 5]
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { renderMetrics } from '../src/controller/metrics.ts';
import type { MigrationReport } from '../src/migration/phases.ts';
import { SqliteStore } from '../src/store/sqlite-store.ts';
import type { MigrationRecord } from '../src/store/store.ts';
import { median } from './lib/common.ts';

const { values } = parseArgs({ options: { migrations: { type: 'string', default: '1000,10000' }, runs: { type: 'string', default: '5' } } });
const sizes = (values.migrations ?? '').split(',').map(Number);
const runs = Number(values.runs);

// A stored plan is what the planner writes for a VM with two disks; the report a completed migration's, with its phases.
const plan = { vm: 'web', from: 'A', to: 'B', toAddress: '10.0.0.2', disks: [{ id: 'root', operation: 'mirror' }, { id: 'data', operation: 'reattach' }], ram: { memoryMiB: 1024, maxDowntimeMs: 300, allowPostcopy: false }, options: {}, refusals: [] } as unknown as MigrationRecord['plan'];
const report: MigrationReport = {
  vm: 'web', from: 'A', to: 'B', outcome: 'completed',
  disks: [{ id: 'root', operation: 'mirror', bytesSent: 2 ** 30, virtualSize: 2 ** 32 }, { id: 'data', operation: 'reattach', bytesSent: 0, virtualSize: 2 ** 34 }],
  ram: { transferredBytes: 2 ** 30, totalBytes: 2 ** 30, passes: 4, memoryCompared: true },
  phases: ['preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'resume-sent', 'resumed', 'source-retired', 'completed'].map((phase, i) => ({ phase, startedAt: i * 1000, endedAt: i * 1000 + 1000 })) as unknown as MigrationReport['phases'],
  totalMs: 12_000, downtimeMs: 120, pauseMs: 150,
  allAttempts: { count: 1, ramBytes: 2 ** 30, diskBytes: 2 ** 30, pauseMs: 150 },
};

const load = (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');
console.log(`${new Date().toISOString()} · load ${load}`);
for (const size of sizes) {
  const dir = await mkdtemp(join(tmpdir(), 'vmferry-metrics-bench-'));
  const store = new SqliteStore(join(dir, 'controller.db'));
  try {
    for (let i = 0; i < size; i++) {
      await store.createMigration({ id: `m${i}`, vm: `vm${i % 50}`, from: 'A', to: 'B', phase: 'pending', plan, report: null, createdAt: i, updatedAt: i });
      await store.updateMigration(`m${i}`, { phase: 'completed', report });
    }
    const times: number[] = [];
    for (let run = 0; run < runs; run++) {
      const start = performance.now();
      renderMetrics(await store.listMigrations(Number.MAX_SAFE_INTEGER), []);
      times.push(performance.now() - start);
    }
    console.log(`${size} stored migrations: one scrape ${median(times).toFixed(0)} ms (median of ${runs}; min ${Math.min(...times).toFixed(0)}, max ${Math.max(...times).toFixed(0)})`);
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
}

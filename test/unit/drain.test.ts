// The drain's budget without QEMU: three VMs, two at a time, 8 MiB/s shared. Fake agents answer the
// planner's probes and record each bandwidth share sent to a source; a fake migration service lets the
// test end each migration when it chooses. At every migration start the caps of those running sum to
// at most the budget (the others were lowered first), and a migration that ends gives its share back.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { DrainService } from '../../src/controller/drain.ts';
import { Inventory } from '../../src/controller/inventory.ts';
import type { MigrationRequest } from '../../src/controller/migrations.ts';
import type { MigrationPhase, MigrationReport } from '../../src/migration/phases.ts';
import type { MigrationPlan } from '../../src/migration/plan.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import type { MigrationRecord } from '../../src/store/store.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
const budgetMiBs = 8;

/** The cap each migration has now, bytes/s: its share at start, then each share its source agent was sent. */
const caps = new Map<string, number>();

async function fakeAgent(hostId: string, vms: string[]): Promise<Server> {
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString()));
    req.on('end', () => {
      const reply = (json: unknown): void => void res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(json));
      const url = req.url ?? '';
      if (url === '/v1/vms') {
        reply(vms.map((name, i) => ({ name, host: hostId, state: 'running', pid: 1, migrating: false, blockJobs: [], spec: { name, memoryMiB: 256 * (i + 1), disks: [] } })));
      } else if (url.endsWith('/probe-source')) {
        reply({ hostId, qemuVersion: '7.2.0', machineType: 'pc-q35-7.2', accelerator: 'tcg', localDisks: {} });
      } else if (url === '/v1/probe-destination') {
        reply({ hostId, address: '10.0.0.9', qemuVersion: '7.2.0', machineTypes: ['pc-q35-7.2'], accelerator: 'tcg', cpu: { model: 'qemu64', unavailableFeatures: [] }, freeMemoryMiB: 8192, poolFreeBytes: 1e12, reachableExports: {}, vmNames: [] });
      } else if (url.endsWith('/source/bandwidth')) {
        const id = decodeURIComponent(url.split('/')[3] ?? '');
        caps.set(id, (JSON.parse(body) as { bytesPerSecond: number }).bytesPerSecond);
        reply({});
      } else {
        res.writeHead(404).end();
      }
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return server;
}

test('a drain keeps the caps of its running migrations within one budget, re-split as they start and end', async () => {
  const work = await makeTempDir('drain-unit');
  const agents = await Promise.all([fakeAgent('A', ['v1', 'v2', 'v3']), fakeAgent('B', []), fakeAgent('C', [])]);
  const store = new SqliteStore(join(work.path, 'controller.db'));
  const records = new Map<string, MigrationRecord>();
  let drains: DrainService | undefined;
  let finish = (_id: string): void => undefined;
  try {
    const inventory = new Inventory(store);
    for (const [i, id] of ['A', 'B', 'C'].entries()) {
      await inventory.heartbeat({ id, url: `http://127.0.0.1:${(agents[i]?.address() as AddressInfo).port}`, address: `10.0.0.${i + 1}` });
    }
    const sumsAtStart: number[] = [];
    const migrations = {
      start: (request: MigrationRequest): Promise<{ plan: MigrationPlan; id?: string }> => {
        const id = `m${records.size + 1}`;
        caps.set(id, Math.round((request.options.bandwidthMiBs ?? 0) * MiB));
        const running = [...records.values()].filter((r) => r.phase === 'migrating').map((r) => r.id);
        sumsAtStart.push([...running, id].reduce((sum, m) => sum + (caps.get(m) ?? Infinity), 0));
        records.set(id, { id, vm: request.vm, from: 'A', to: request.to, phase: 'migrating', plan: {} as MigrationPlan, report: null, createdAt: Date.now(), updatedAt: Date.now() });
        return Promise.resolve({ plan: {} as MigrationPlan, id });
      },
      get: (id: string): Promise<MigrationRecord> => Promise.resolve(records.get(id) as MigrationRecord),
    };
    finish = (id: string): void => {
      const record = records.get(id) as MigrationRecord;
      const now = Date.now();
      const phases = (['mirroring', 'migrating', 'resume-sent', 'completed'] as MigrationPhase[]).map((phase, i) => ({ phase, startedAt: now - 3000 + i * 1000, durationMs: 1000 }));
      const report = { vm: record.vm, from: 'A', to: record.to, outcome: 'completed', disks: [{ id: 'root', operation: 'mirror', bytesSent: 4 * MiB, virtualSize: 16 * MiB }], ram: { transferredBytes: 8 * MiB, totalBytes: 64 * MiB, passes: 1, memoryCompared: true }, phases, totalMs: 4000, downtimeMs: 40 } as MigrationReport;
      records.set(id, { ...record, phase: 'completed', report });
    };
    const until = async (what: string, check: () => boolean): Promise<void> => {
      for (const deadline = Date.now() + 10_000; !check(); await sleep(50)) assert.ok(Date.now() < deadline, what);
    };

    drains = new DrainService(store, inventory, migrations, pino({ level: 'silent' }));
    const { id } = await drains.start({ host: 'A', parallel: 2, bandwidthMiBs: budgetMiBs });
    assert.equal((await inventory.hosts()).find((h) => h.id === 'A')?.draining, true);
    await until('two migrations start', () => records.size === 2);
    assert.equal(caps.get('m1'), (budgetMiBs * MiB) / 2, 'the first one was lowered to half before the second started');
    assert.equal(caps.get('m2'), (budgetMiBs * MiB) / 2);
    assert.deepEqual([...records.values()].map((r) => r.vm), ['v3', 'v2'], 'the largest VMs first');
    assert.notEqual(records.get('m1')?.to, records.get('m2')?.to, 'the second goes where more memory is left');

    finish('m1');
    await until('the third starts once one ends', () => records.size === 3);
    assert.equal(caps.get('m2'), (budgetMiBs * MiB) / 2);
    finish('m2');
    await until('the last one gets the whole budget', () => caps.get('m3') === budgetMiBs * MiB);
    finish('m3');
    await until('the drain ends', () => drains?.get(id).state !== 'running');

    assert.ok(sumsAtStart.every((sum) => sum <= budgetMiBs * MiB), `caps at each start: ${sumsAtStart.join(', ')}`);
    const status = drains.get(id);
    assert.equal(status.state, 'done');
    assert.deepEqual(status.vms.map((v) => v.state), ['completed', 'completed', 'completed']);
    assert.equal(status.transfer?.bytes, 3 * 12 * MiB);
    await drains.undrain('A');
    assert.equal((await inventory.hosts()).find((h) => h.id === 'A')?.draining, false);

    // A controller started afterwards on the same store (a restart, or another leader) still shows the drain and each VM's outcome.
    await drains.close();
    const restarted = new DrainService(store, inventory, migrations, pino({ level: 'silent' }));
    assert.deepEqual(await restarted.find(id), status);
    assert.deepEqual((await restarted.history()).map((d) => d.id), [id]);
  } finally {
    // Its loop ends once no migration of it runs: ended here, also when an assertion failed first.
    for (const id of records.keys()) if (records.get(id)?.phase === 'migrating') finish(id);
    await drains?.close();
    await store.close();
    for (const agent of agents) agent.close();
    await work.remove();
  }
});

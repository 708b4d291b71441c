// The source host loses power mid-migration: its QEMU dies with its agent, the disks stay. The restarted
// agent keeps the half as "dead" until the controller says what the disks are. Found by the chaos campaign
// (seed 91642 run 47): the agent dropped the half, the controller's retire got "no source", and host A kept
// an old copy of a VM that ran on B, listed twice by `vm list`.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { AgentClient, RemoteSource } from '../../src/agent/client.ts';
import { buildAgent } from '../../src/agent/server.ts';
import { hasCode } from '../../src/errors.ts';
import { testGuestBoot, testGuestDir } from '../../src/guest/test-guest.ts';
import { defaultMigrationOptions, planMigration, type DestinationFacts } from '../../src/migration/plan.ts';
import { makeTempDir } from '../support/temp.ts';

const running: FastifyInstance[] = [];
after(async () => {
  for (const app of running) await app.close();
});

async function startAgent(dataDir: string): Promise<AgentClient> {
  const { app } = await buildAgent({ hostId: 'A', dataDir, address: '127.0.0.1', logger: pino({ level: 'silent' }), abandonAfterMs: 0, trustedDirs: [testGuestDir()] });
  running.push(app);
  return new AgentClient(await app.listen({ host: '127.0.0.1', port: 0 }));
}

/** A VM on A, bound as the source of migration `id`, then A "loses power": QEMU killed, agent gone, agent restarted. */
async function powerLossDuringMigration(name: string, id: string): Promise<{ client: AgentClient; disk: string; dataDir: string }> {
  const dir = await makeTempDir(`dead-source-${name}`);
  after(() => dir.remove());
  const dataDir = join(dir.path, 'agent');
  const first = await startAgent(dataDir);
  const vm = await first.createVm({ name, memoryMiB: 128, ...testGuestBoot(), disks: [{ id: 'root', local: { sizeBytes: 32 << 20 } }] });
  const started = await first.startVm(name);
  const destination: DestinationFacts = { hostId: 'B', address: '127.0.0.2', qemuVersion: '7.2.0', machineTypes: [], accelerator: 'tcg', cpu: { model: 'qemu64', unavailableFeatures: [] }, freeMemoryMiB: 0, poolFreeBytes: 0, reachableExports: {}, vmNames: [] };
  await new RemoteSource('A', first, id).begin(planMigration(vm.spec, await first.probeSource(name), destination, defaultMigrationOptions));
  const disk = vm.spec.disks[0]?.source.kind === 'file' ? vm.spec.disks[0].source.path : assert.fail('a local disk');
  process.kill(started.pid as number, 'SIGKILL');
  await (running.pop() as FastifyInstance).close();
  return { client: await startAgent(dataDir), disk, dataDir };
}

test('a completed migration whose source died with its host: the restarted agent holds the half, and the controller\'s retire removes the old copy', async () => {
  const { client, disk, dataDir } = await powerLossDuringMigration('gone', 'm-completed');
  assert.deepEqual((await client.migrationHalves('m-completed')).source, { vm: 'gone', settling: false }, 'the half is held for the controller');
  await assert.rejects(client.startVm('gone'), (err: unknown) => hasCode(err, 'VMF_CONFLICT'), 'the old copy cannot be started meanwhile');
  await new RemoteSource('A', client, 'm-completed').retire(false);
  await assert.rejects(client.getVm('gone'), (err: unknown) => hasCode(err, 'VMF_NOT_FOUND'), 'A no longer lists the VM that runs on B');
  assert.equal(existsSync(disk), false, "A's old copy of the disk is deleted");
  assert.equal(existsSync(join(dataDir, 'vms', 'gone')), false);
  assert.equal((await client.migrationHalves('m-completed')).source, null);
});

test('a migration rolled back after its source died with its host: the VM stays on A, stopped, with its disk, and starts again', async () => {
  const { client, disk } = await powerLossDuringMigration('kept', 'm-rolled-back');
  await new RemoteSource('A', client, 'm-rolled-back').rollback();
  assert.equal(existsSync(disk), true, 'the disk is kept: it is the VM');
  const info = await client.getVm('kept');
  assert.equal(info.state, 'stopped');
  assert.equal(info.migrating, false);
  assert.equal((await client.startVm('kept')).state, 'running', 'its owner can start it again');
  await client.stopVm('kept', true);
});

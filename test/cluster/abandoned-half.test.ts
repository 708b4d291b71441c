// The controller vanishes while the source's guest is paused at pre-switchover
// (QEMU waits there for migrate-continue, which only the controller sends).
// The source's agent, a real one in this process, must notice the silence and
// bring the guest back on its host by itself; a controller that turns up
// later is told what happened, and one that turns up in the middle of it does
// not race it. The destination is a plain QemuDestination.
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { AgentClient, RemoteSource } from '../../src/agent/client.ts';
import type { VmInfo } from '../../src/api/agent-types.ts';
import { buildAgent } from '../../src/agent/server.ts';
import { hasCode } from '../../src/errors.ts';
import { testGuestBoot, testGuestDir } from '../../src/guest/test-guest.ts';
import { defaultMigrationOptions, planMigration } from '../../src/migration/plan.ts';
import { probeDestination, qemuCapabilities } from '../../src/migration/probe.ts';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { LocalPool } from '../../src/storage/local-pool.ts';
import { recordReliability } from '../support/reliability.ts';

const abandonAfterMs = 2_000;
let dir: string;
let agent: FastifyInstance;
let client: AgentClient;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-abandon-'));
  agent = (await buildAgent({ hostId: 'A', dataDir: join(dir, 'agent'), address: '127.0.0.1', logger: pino({ level: 'silent' }), abandonAfterMs, trustedDirs: [testGuestDir()] })).app;
  client = new AgentClient(await agent.listen({ host: '127.0.0.1', port: 0 }));
});

after(async () => {
  await agent.close();
  await rm(dir, { recursive: true, force: true });
});

interface PausedAtSwitchover {
  vm: VmInfo;
  source: RemoteSource;
  destination: QemuDestination;
  signal: AbortSignal;
}

/** What a controller does up to pre-switchover, then nothing: it "crashed". The guest is paused on A. */
async function pauseAtSwitchover(name: string, id: string, run: (paused: PausedAtSwitchover) => Promise<void>): Promise<void> {
  const vm = await client.createVm({ name, memoryMiB: 128, ...testGuestBoot({ intervalMs: 100 }), disks: [{ id: 'root', local: { sizeBytes: 64 << 20 } }] });
  await client.startVm(vm.name);
  await mkdir(join(dir, `pool-${name}`));
  const pool = new LocalPool(join(dir, `pool-${name}`));
  const destination = new QemuDestination({ hostId: 'B', pool, vmDir: (vmName) => join(dir, `run-${name}`, vmName), address: '127.0.0.1' });
  try {
    // Planned before the source half is bound, as the controller does: from then on the half counts the controller's silence.
    const qemu = await qemuCapabilities();
    const plan = planMigration(vm.spec, await client.probeSource(vm.name), await probeDestination('B', '127.0.0.1', vm.spec, pool, [], qemu), defaultMigrationOptions);
    const source = new RemoteSource('A', client, id);
    await source.begin(plan);
    await assert.rejects(new RemoteSource('A', client, `${id}-again`).begin(plan), (err: unknown) => hasCode(err, 'VMF_CONFLICT') && new RegExp(`still the source of migration ${id}`).test((err as Error).message), 'a second migration of the VM is refused while the first has a half here');
    const signal = AbortSignal.timeout(120_000);
    const prepared = await destination.prepare(vm.spec, plan, signal);
    assert.deepEqual(prepared.mirrorTargets.length, 1);
    // Disks and RAM go only to the destination of the plan the half was begun with, whatever the controller forwards.
    const elsewhere = prepared.mirrorTargets.map((t) => ({ ...t, server: { type: 'inet' as const, host: '127.0.0.66', port: 10809 } }));
    await assert.rejects(source.startMirrors(elsewhere, 'write-blocking', undefined, signal), (err: unknown) => hasCode(err, 'VMF_FORBIDDEN') && /mirror of disk root would go to 127\.0\.0\.66:10809/.test((err as Error).message));
    await assert.rejects(source.startMigration('tcp:127.0.0.66:4444', { maxBandwidthBytes: undefined, downtimeLimitMs: 300, allowPostcopy: false, tls: prepared.tls }, signal), (err: unknown) => hasCode(err, 'VMF_FORBIDDEN'));
    await source.startMirrors(prepared.mirrorTargets, 'write-blocking', undefined, signal);
    while (!(await source.mirrorStatus(signal, 1000)).every((m) => m.ready)) await sleep(10);
    assert.deepEqual((await client.getVm(vm.name)).blockJobs, ['mirror-root'], 'the agent lists the mirror its QEMU runs');
    await source.startMigration(prepared.migrationUri, { maxBandwidthBytes: undefined, downtimeLimitMs: 300, allowPostcopy: false, tls: prepared.tls }, signal);
    assert.equal(await source.waitMilestone(signal), 'pre-switchover');
    const paused = await client.getVm(vm.name);
    assert.equal(paused.state, 'paused', 'QEMU paused the guest for the switch-over');
    await run({ vm: paused, source, destination, signal });
  } finally {
    await destination.rollback();
    // The agent leaves guests running when it closes (it re-adopts them); a stop is refused while the VM is still migrating.
    const { pid } = await client.getVm(vm.name);
    if (pid) process.kill(pid, 'SIGKILL');
  }
}

async function waitDestinationExit(destination: QemuDestination): Promise<void> {
  // The destination's incoming migration failed when the source cancelled, so its QEMU exited.
  const exitDeadline = Date.now() + 10_000;
  while (destination.vm?.isAlive) {
    assert.ok(Date.now() < exitDeadline, 'the destination QEMU did not exit after the source cancelled');
    await sleep(100);
  }
}

test('a guest paused at pre-switchover whose controller went away runs again on its host after --abandon-after', async () => {
  const id = 'm-abandoned';
  await pauseAtSwitchover('paused', id, async ({ vm, source, destination, signal }) => {
    const silentSince = Date.now();
    const deadline = silentSince + abandonAfterMs + 15_000;
    while ((await client.getVm(vm.name)).state !== 'running') {
      assert.ok(Date.now() < deadline, 'the guest stayed paused: nothing settled the abandoned source');
      await sleep(100);
    }
    const pausedForMs = Date.now() - silentSince;
    assert.ok(pausedForMs >= abandonAfterMs, `resumed after ${pausedForMs} ms, before the silence lasted ${abandonAfterMs} ms`);
    // The guest runs a moment before the agent's rollback has returned and let go of the half.
    while ((await client.migrationHalves(id)).source !== null) {
      assert.ok(Date.now() < deadline, 'the agent kept its half after the guest ran again');
      await sleep(20);
    }
    const info = await client.getVm(vm.name);
    assert.equal(info.migrating, false, 'the VM is free for its owner again');
    assert.deepEqual(info.blockJobs, [], 'no mirror is left running in the guest it resumed');
    assert.equal(info.pid, vm.pid, 'the same QEMU runs the guest: it was resumed, not restarted');
    await waitDestinationExit(destination);
    // A controller that comes back and carries on is told, not obeyed.
    await assert.rejects(source.continueSwitchover(signal), (err: unknown) => hasCode(err, 'VMF_CONFLICT') && /rolled back its half of migration m-abandoned/.test(String(err)));
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'controller',
      tried: `the controller stopped talking while the guest was paused at pre-switchover (agent --abandon-after ${abandonAfterMs / 1000} s)`,
      observed: `the agent rolled its half back and the guest ran again after ${pausedForMs} ms; a late migrate-continue got 409 VMF_CONFLICT`,
      ok: true,
    });
  });
});

test('a controller that comes back while the agent is settling the half: its rollback waits for the agent and succeeds', async () => {
  const id = 'm-returning';
  await pauseAtSwitchover('returning', id, async ({ vm, source, destination }) => {
    // The agent's settle starts with a QMP query: with its QEMU stopped (SIGSTOP) that query waits, which
    // holds the settle open long enough for the controller's rollback to arrive in the middle of it.
    const qemuPid = vm.pid as number;
    process.kill(qemuPid, 'SIGSTOP');
    let rollback: Promise<void> | undefined;
    let rolledBack = false;
    try {
      // Reading the halves is not contact (and asks QEMU nothing), so polling it does not keep the half alive.
      const deadline = Date.now() + abandonAfterMs + 15_000;
      while ((await client.migrationHalves(id)).source?.settling !== true) {
        assert.ok(Date.now() < deadline, 'the agent never started settling the abandoned source');
        await sleep(20);
      }
      // The controller, restarted, settles what it finds: a rollback of the source.
      rollback = source.rollback().then(() => {
        rolledBack = true;
      });
      await sleep(300);
      assert.equal(rolledBack, false, "the controller's rollback returned while the agent's was still in progress");
    } finally {
      process.kill(qemuPid, 'SIGCONT');
    }
    await rollback;
    const info = await client.getVm(vm.name);
    assert.equal(info.state, 'running', 'the guest runs on its host once the rollback returns');
    assert.equal(info.migrating, false, 'the VM is free for its owner again');
    assert.deepEqual(info.blockJobs, [], 'no mirror is left running in the guest it resumed');
    assert.equal(info.pid, vm.pid, 'the same QEMU runs the guest: it was resumed, not restarted');
    assert.equal((await client.migrationHalves(id)).source, null, 'the half is gone');
    // The agent's settle had finished when the controller's rollback returned: it left its word for late requests.
    await assert.rejects(source.continueSwitchover(AbortSignal.timeout(10_000)), (err: unknown) => hasCode(err, 'VMF_CONFLICT') && /rolled back its half of migration m-returning/.test(String(err)));
    await waitDestinationExit(destination);
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'controller',
      tried: 'a returning controller rolled back the source half while the agent was already rolling it back by itself',
      observed: "the controller's rollback waited for the agent's and returned; the guest ran on its host in the same QEMU",
      ok: true,
    });
  });
});

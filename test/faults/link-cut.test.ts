// The network link between the hosts cut in the middle of a migration, end to
// end: two hosts in their own network namespaces, the migration stream and
// the mirror exports on a direct veth pair between them, the controller and
// the storage server on a bridge that stays up. A cut link fails no socket for
// many minutes (TCP keeps retransmitting), so the stall watch must notice, and
// the source must roll back although QEMU's migration is stuck on a dead
// socket. Afterwards the VM runs on A only, nothing is left on B, every
// acknowledged record is intact, and with the link back a migration succeeds.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import type { MigrationEvent } from '../../src/migration/phases.ts';
import { FaultCluster } from '../support/fault-cluster.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';

const stallTimeoutS = 5;
/** From the cut to a failed record: the stall timeout, a poll or two, and a rollback that must not hang. */
const maxFailMs = 60_000;

let faults: FaultCluster;
let cluster: LocalCluster | undefined;
let work: { path: string; remove(): Promise<void> } | undefined;

before(async () => {
  assert.equal(process.getuid?.(), 0, 'the fault tests build network namespaces and need root (CI runs as root)');
  work = await makeTempDir('link-cut');
  cluster = await LocalCluster.start({
    workDir: join(work.path, 'cluster'),
    hostIds: ['A', 'B'],
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    // No KVM probe at each agent start (3 s where KVM hangs): test/qemu/accel.test.ts covers --accel auto.
    accel: 'tcg',
    namespaces: true,
    network: { prefix: 'vmfl', subnet: '10.213.27', hostLinkSubnet: '10.213.28' },
  });
  faults = new FaultCluster(cluster, work.path);
});
after(async () => {
  await cluster?.network?.setHostLink(true).catch(() => undefined);
  await cluster?.stop();
  await work?.remove();
});

/** Waits for a progress event of migration `id` that satisfies `matches`: the fault lands on observed progress, not on a sleep. */
async function waitForEvent(id: string, matches: (event: MigrationEvent) => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let after = 0;
  for (;;) {
    const { phase, events } = await faults.cluster.api.events(id, after);
    if (events.some((e) => matches(e.event))) return;
    after = events.at(-1)?.seq ?? after;
    if (['completed', 'failed', 'cancelled'].includes(phase)) throw new Error(`migration ${id} ended "${phase}" before the awaited progress`);
    if (Date.now() > deadline) throw new Error(`migration ${id} showed no such progress within ${timeoutMs} ms (phase ${phase})`);
    await sleep(100);
  }
}

const cases = [
  {
    phase: 'mirroring',
    // Bulk writes give the local disk tens of MiB to mirror, at 2 MiB/s: the mirror is still copying at the cut.
    guest: { intervalMs: 0, bulkMiBs: 2 },
    settleMs: 8_000,
    bandwidthMiBs: 2,
    inProgress: (e: MigrationEvent) => e.type === 'disks' && e.disks.some((d) => d.id === 'root' && d.bytesDone > 0 && !d.ready),
  },
  {
    phase: 'migrating',
    // A guest that dirties memory has tens of MiB of RAM to send, at 2 MiB/s: pre-copy is still running at the cut.
    guest: { intervalMs: 0, dirtyMiB: 16, dirtyRateMiBs: 2 },
    settleMs: 0,
    bandwidthMiBs: 2,
    inProgress: (e: MigrationEvent) => e.type === 'ram' && e.ram.transferredBytes > 0 && e.ram.remainingBytes > 8 * 1024 * 1024,
  },
] as const;

for (const c of cases) {
  test(`the link between the hosts cut while ${c.phase}: the migration fails within the stall timeout, rolls back, and a retry succeeds`, async () => {
    const vm = `cut-${c.phase.slice(0, 3)}`;
    await faults.startVm(vm, c.guest);
    if (c.settleMs > 0) await sleep(c.settleMs);
    const { id } = await faults.cluster.api.migrate({ vm, to: 'B', bandwidthMiBs: c.bandwidthMiBs, stallTimeoutS });
    await waitForEvent(id as string, c.inProgress, 90_000);

    await faults.cluster.network?.setHostLink(false);
    const cutAt = Date.now();
    let failedAfterMs: number;
    try {
      const record = await faults.finalRecord(id as string, maxFailMs);
      failedAfterMs = Date.now() - cutAt;
      assert.equal(record.phase, 'failed');
      const message = record.report?.error?.message ?? '';
      assert.match(message, /no progress .*network between the hosts down/, message);
      assert.doesNotMatch(message, /rollback problems/, message);
      const phases = record.report?.phases.map((p) => p.phase) ?? [];
      assert.ok(phases.includes(c.phase), `the cut landed while ${c.phase}: ${phases.join(', ')}`);
      assert.ok(!phases.includes(c.phase === 'mirroring' ? 'migrating' : 'paused-at-switchover'), `the cut landed while ${c.phase}: ${phases.join(', ')}`);
      await faults.assertRunsOnlyOn(vm, 'A');
      recordReliability(import.meta.url, {
        kind: 'fault',
        target: 'migration',
        tried: `migration link cut (ip link down on the veth pair) while ${c.phase}, stall timeout ${stallTimeoutS} s`,
        observed: `failed ${Math.round(failedAfterMs / 1000)} s after the cut: "${message.slice(0, 140)}"; VM on A only, guest kept writing, nothing left on B`,
        ok: true,
      });
    } finally {
      await faults.cluster.network?.setHostLink(true);
    }

    const retry = await faults.cluster.api.migrate({ vm, to: 'B' });
    const retried = await faults.finalRecord(retry.id as string);
    assert.equal(retried.phase, 'completed', retried.report?.error?.message);
    const outcome = await faults.assertSettled(vm, 'B');
    recordReliability(import.meta.url, {
      kind: 'fault',
      target: 'migration',
      tried: `migration retried after the link cut while ${c.phase} was restored`,
      observed: `completed in ${Math.round((retried.report?.totalMs ?? 0) / 1000)} s; ${outcome}`,
      ok: true,
    });
  });
}

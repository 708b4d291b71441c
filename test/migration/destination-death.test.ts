// Rollbacks that meet what they undo half-done, on one guest (it runs on A after each case, as a fresh one would).
//
// A destination QEMU that dies just before its rollback (killed, crashed) must still be rolled back:
// the rollback sees it gone, not an error, so the source can take its guest back and nothing is left on B.
// Found by the chaos campaign (seed 91642 run 34, seed 26958 run 88): a rollback that asked the dying QEMU
// for its run state failed with "exited during query-status" and left B's half, its image and its directory.
//
// A source rollback that lands while the mirrors start (a new leader's, while a request of the paused old
// leader's still runs on the agent) must leave no mirror job or target node on A. Found in
// test/faults/ha-failover.test.ts: the rollback looked before the mirror's blockdev-add was sent, the node
// stayed, and the next migration of the VM failed with "Duplicate nodes with node-name='mirror-target-root'".
// Such a rollback must not yank a mirror target while QEMU still runs the blockdev-add or blockdev-mirror that
// builds it, and must stop the guest before it ends the mirror jobs: QEMU 7.2 died of SIGSEGV or SIGABRT (heap
// corrupted) in 2 of 8 runs of this file on a loaded machine, and often within a few rollbacks that landed right
// after an active mirror started while the guest wrote.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, test } from 'node:test';
import { checkVerify } from '../../src/guest/test-guest.ts';
import { describeError } from '../../src/errors.ts';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { QemuSource } from '../../src/migration/qemu-source.ts';
import type { SourceRolledBack } from '../../src/migration/sides.ts';
import type { QemuProcess } from '../../src/qemu/process.ts';
import type { QmpEventListener } from '../../src/qmp/events.ts';
import { diskNodeName } from '../../src/qemu/spec.ts';
import { MigrationRig } from '../support/migration-rig.ts';

let rig: MigrationRig | undefined;
after(() => rig?.cleanup.run());

async function vmOnA(): Promise<MigrationRig> {
  rig ??= await MigrationRig.start('deathb', { local: [{ id: 'root', sizeMiB: 32 }], shared: [] }, { mode: 'workload', spanMiB: 8 });
  return rig;
}

function destinationOf(rig: MigrationRig): QemuDestination {
  const destination = new QemuDestination({ hostId: 'B', pool: rig.poolB, vmDir: (vm) => join(rig.dir, 'runB', vm), address: '127.0.0.1' });
  rig.destination = destination;
  return destination;
}

test('a destination whose QEMU was just killed rolls back as gone, leaving nothing on B', async () => {
  const rig = await vmOnA();
  const plan = await rig.plan();
  const destination = destinationOf(rig);
  await destination.prepare(rig.spec, plan, AbortSignal.timeout(60_000));
  const qemu = destination.vm;
  assert.ok(qemu?.isAlive, 'the incoming QEMU runs');
  // The kill lands before this process has seen the exit: the QEMU still looks alive to the rollback.
  process.kill(qemu.pid, 'SIGKILL');
  assert.equal(await destination.fate(), 'gone', 'a QEMU that died before any resume is gone');
  await destination.rollback();
  assert.deepEqual(rig.poolBFiles(), [], "B's copy of the disk is removed");
  assert.equal(existsSync(join(rig.dir, 'runB', rig.spec.name)), false, "B's VM directory is removed");
});

/**
 * Calls `sent` with each command's name right after it went to `qemu`, before its reply is read, until the
 * returned function is called. A test-only hook on the monitor.
 */
function onSent(qemu: QemuProcess, sent: (command: string) => void): () => void {
  const client = qemu.monitor.client;
  const execute = client.execute.bind(client);
  client.execute = ((name: string, ...rest: Parameters<typeof execute> extends [string, ...infer R] ? R : never) => {
    const reply = execute(name, ...rest);
    sent(name);
    return reply;
  }) as typeof client.execute;
  return () => Reflect.deleteProperty(client, 'execute');
}

/** The mirrors' commands that build a node or job QEMU 7.2 crashed on when a yank landed beside them. */
const building = ['blockdev-add', 'blockdev-mirror'];

/** vmferry's mirror jobs and target nodes on `qemu`: none may outlive a migration. */
async function mirrorLeftovers(qemu: QemuProcess): Promise<string[]> {
  const [jobs, nodes] = await qemu.qmp('listing mirror leftovers', async (qmp) => [
    await qmp.queryBlockJobs(),
    await qmp.client.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true }),
  ]);
  return [...jobs.map((j) => `job ${j.device} (${j.status})`), ...nodes.filter((n) => n['node-name'].startsWith('mirror-')).map((n) => `node ${n['node-name']}`)];
}

test("a source rollback while QEMU's main loop is stuck still yanks the mirror targets it built, within a bound; the guest runs on A", async (t) => {
  const rig = await vmOnA();
  const plan = await rig.plan();
  const destination = destinationOf(rig);
  const prepared = await destination.prepare(rig.spec, plan, AbortSignal.timeout(60_000));
  const source = new QemuSource({ hostId: 'A', vm: rig.source });
  await source.startMirrors(prepared.mirrorTargets, plan.options.copyMode, undefined, AbortSignal.timeout(60_000));
  // blkdebug reads its config file in the main loop, and opening a FIFO blocks until a writer comes: the main
  // loop stays stuck, as behind requests on a cut link (test/qmp/oob.test.ts), and answers nothing in-band.
  const fifo = join(rig.dir, 'stuck.fifo');
  execFileSync('mkfifo', [fifo]);
  const stuck = rig.source.monitor.client.execute('blockdev-add', { driver: 'blkdebug', 'node-name': 'stuck', config: fifo, image: { driver: 'null-co' } }, { timeoutMs: 60_000 });
  const started = Date.now();
  let yankedAfterMs: number | undefined;
  const unhook = onSent(rig.source, (command) => {
    if (command === 'yank') yankedAfterMs ??= Date.now() - started;
  });
  const rolledBack = source.rollback();
  while (yankedAfterMs === undefined && Date.now() - started < 15_000) await sleep(50);
  await (await open(fifo, 'w')).close();
  await stuck;
  await rolledBack;
  unhook();
  await rig.source.monitor.blockdevDel('stuck');
  await destination.rollback();
  // The wait for what QEMU was running is bounded; the query-migrate left unanswered would yank only later.
  t.diagnostic(`yanked ${yankedAfterMs} ms after the rollback began`);
  assert.ok(yankedAfterMs !== undefined && yankedAfterMs < 5_000, `the mirror target was yanked while the main loop was stuck (after ${yankedAfterMs} ms)`);
  assert.ok(rig.source.isAlive, 'the source QEMU lives');
  assert.deepEqual(await mirrorLeftovers(rig.source), [], 'nothing of the mirrors is left on A');
  assert.equal((await rig.source.status()).status, 'running', 'the guest runs on A');
  assert.deepEqual(rig.poolBFiles(), [], 'nothing is left on B');
});

test('a destination pool on a file system without direct I/O: a cache=none disk is refused before anything is copied, naming the disk and the fix; the guest runs on A', async (t) => {
  const rig = await vmOnA();
  await rig.waitForAcks(2);
  // Planned first: ramfs reports no free space, which the planner would refuse on its own.
  const plan = await rig.plan();
  // ramfs takes no O_DIRECT (tmpfs does since Linux 6.6).
  execFileSync('mount', ['-t', 'ramfs', 'vmferry-test', rig.poolB.dir]);
  t.after(() => execFileSync('umount', [rig.poolB.dir]));
  const report = await rig.migrate(plan, { memoryMismatchRetries: 0 });
  assert.equal(report.outcome, 'failed');
  assert.match(report.error?.message ?? '', /disk root has cache none, which opens its image with O_DIRECT, and its copy .*poolB.* on B cannot be .*put that pool on a file system with direct I\/O, or give the disk cache writeback/);
  assert.ok(!report.phases.some((p) => p.phase === 'mirroring'), `nothing was mirrored: ${report.phases.map((p) => p.phase).join(', ')}`);
  assert.equal((await rig.source.status()).status, 'running', 'the guest runs on A');
  assert.deepEqual(rig.poolBFiles(), [], 'nothing is left on B');
});

test('a disk node that something else holds: the mirror waits for it to go, and after a bound names it', async () => {
  const rig = await vmOnA();
  await rig.waitForAcks(2);
  const hold = (): Promise<void> =>
    rig.source.qmp('holding the disk node', (qmp) => qmp.blockdevAdd({ driver: 'raw', 'node-name': 'holder', file: diskNodeName('root'), 'read-only': true }));
  const release = (): Promise<void> => rig.source.qmp('releasing the disk node', (qmp) => qmp.blockdevDel('holder'));
  for (const releasedAfterMs of [undefined, 500]) {
    await hold();
    const plan = await rig.plan();
    const destination = destinationOf(rig);
    const prepared = await destination.prepare(rig.spec, plan, AbortSignal.timeout(60_000));
    const source = new QemuSource({ hostId: 'A', vm: rig.source });
    const releasing = releasedAfterMs === undefined ? undefined : sleep(releasedAfterMs).then(release);
    const started = await source.startMirrors(prepared.mirrorTargets, plan.options.copyMode, undefined, AbortSignal.timeout(60_000)).then(
      () => 'started',
      (err: unknown) => describeError(err),
    );
    await releasing;
    await source.rollback();
    await destination.rollback();
    if (releasedAfterMs === undefined) {
      assert.match(started, /QEMU on A will not mirror disk-root: for 3000 ms it was in use by node holder \(as its file\)/);
      await release();
    } else {
      assert.equal(started, 'started', `the mirror started once the holder went, ${releasedAfterMs} ms in`);
    }
    assert.deepEqual(await mirrorLeftovers(rig.source), []);
    assert.equal((await rig.source.status()).status, 'running', 'the guest runs on A');
    assert.deepEqual(rig.poolBFiles(), [], 'nothing is left on B');
  }
});

// Found looking for why A's QEMU was gone once in test/faults/ha-failover.test.ts, after a new leader rolled back a
// migration its predecessor had left at the switch-over (the likely cause, not proven). From pre-switchover on QEMU
// resumes the guest itself when the migration is cancelled,
// and the rollback cancelled it before it ended the mirrors (their targets yanked): the guest wrote while they ended,
// which QEMU 7.2 does not always survive (see the rollback that lands while the mirrors start, below).
test('a rollback at the switch-over (the guest paused by QEMU, the destination rolled back first) ends the mirrors before the guest runs again; it runs on A and writes on', async () => {
  const rig = await vmOnA();
  await rig.waitForAcks(2);
  let listener: QmpEventListener | undefined;
  const report = await rig.migrate(await rig.plan(), {
    memoryMismatchRetries: 0,
    beforePhase: (phase) => {
      if (phase !== 'paused-at-switchover') return Promise.resolve();
      listener = rig.source.monitor.client.listen();
      return Promise.reject(new Error('a fault injected at the switch-over'));
    },
  });
  try {
    assert.equal(report.outcome, 'failed', 'the migration was rolled back');
    assert.ok(listener, 'the migration reached the switch-over');
    const resumes = listener.takeBuffered('RESUME').map((e) => e.timestampUs);
    const mirrorsGone = listener
      .takeBuffered('JOB_STATUS_CHANGE')
      .filter((e) => String(e.data.id).startsWith('mirror-') && e.data.status === 'null')
      .map((e) => e.timestampUs);
    assert.ok(resumes.length > 0, 'the guest was resumed on A');
    assert.ok(mirrorsGone.length > 0, 'the mirror jobs were dismissed');
    assert.ok(
      Math.max(...mirrorsGone) < Math.min(...resumes),
      `the guest ran again ${Math.round((Math.max(...mirrorsGone) - Math.min(...resumes)) / 1000)} ms before the last mirror job was gone`,
    );
  } finally {
    listener?.close();
  }
  assert.equal((await rig.source.status()).status, 'running', 'the guest runs on A');
  assert.deepEqual(await mirrorLeftovers(rig.source), [], 'nothing of the mirrors is left on A');
  assert.deepEqual(rig.poolBFiles(), [], 'nothing is left on B');
  await rig.waitForAcks(3, (await rig.waitForAcks(0)).acks);
});

test('a source rollback that lands while its mirrors start leaves no mirror job or node behind; the next migration of the VM, even past an older leftover, completes, every acked record intact', async () => {
  const rig = await vmOnA();
  await rig.waitForAcks(5);
  // Before the mirrors' first request, as their blockdev-add is in flight, as their blockdev-mirror is.
  for (const point of ['start', 'blockdev-add', 'blockdev-mirror']) {
    const plan = await rig.plan();
    const destination = destinationOf(rig);
    const prepared = await destination.prepare(rig.spec, plan, AbortSignal.timeout(60_000));
    const source = new QemuSource({ hostId: 'A', vm: rig.source });
    let rolledBack: Promise<SourceRolledBack> | undefined;
    const rollBack = (): void => {
      rolledBack ??= source.rollback();
    };
    // Every yank, and what of the mirrors' building QEMU had not answered when it went out.
    const yanks: string[][] = [];
    // What the source was sent once the rollback began, in order.
    const sentInRollback: string[] = [];
    const client = rig.source.monitor.client;
    const unhook = onSent(rig.source, (command) => {
      if (rolledBack) sentInRollback.push(command);
      if (command === point) rollBack();
      if (command === 'query-yank' || command === 'yank') yanks.push(client.unanswered.filter((c) => building.includes(c)));
    });
    const starting = source.startMirrors(prepared.mirrorTargets, plan.options.copyMode, undefined, AbortSignal.timeout(60_000));
    if (point === 'start') rollBack();
    const started = await starting.then(
      () => 'started',
      (err: unknown) => `refused: ${describeError(err)}`,
    );
    assert.ok(rolledBack, `the rollback was sent at ${point}`);
    await rolledBack;
    unhook();
    await destination.rollback();
    assert.ok(rig.source.isAlive, `the source QEMU lives after a rollback at ${point}`);
    // The target being built is yanked once QEMU built it: the rollback of a cut link relies on it.
    if (point !== 'start') assert.ok(yanks.length > 0, `the rollback at ${point} yanked the mirror target`);
    assert.deepEqual(yanks.flat(), [], `no yank went out while QEMU still ran the mirrors' ${building.join(' or ')} (rollback at ${point})`);
    // Ending a write-blocking mirror while the guest wrote crashed QEMU 7.2: the writing guest is stopped first, and continued after.
    const mirrorEnded = sentInRollback.findIndex((command) => command === 'block-job-cancel' || command === 'job-dismiss');
    if (point === 'blockdev-mirror') assert.ok(mirrorEnded >= 0, `the rollback at ${point} ended the mirror job: ${sentInRollback.join(', ')}`);
    if (mirrorEnded >= 0) {
      const stop = sentInRollback.indexOf('stop');
      assert.ok(stop >= 0 && stop < mirrorEnded, `the guest was stopped before its mirror job was ended (rollback at ${point}): ${sentInRollback.join(', ')}`);
      assert.ok(sentInRollback.indexOf('cont') > mirrorEnded, `the guest was continued after (rollback at ${point}): ${sentInRollback.join(', ')}`);
    }
    assert.deepEqual(await mirrorLeftovers(rig.source), [], `nothing of the mirrors is left on A after a rollback at ${point} (the mirrors' start: ${started})`);
    assert.equal((await rig.source.status()).status, 'running', 'the guest runs on A');
    assert.deepEqual(rig.poolBFiles(), [], 'nothing is left on B');
  }
  // What an agent of an older version could leave after such a race: a mirror job and its target. The next migration removes them first.
  await rig.source.qmp('leaving a mirror behind', async (qmp) => {
    await qmp.blockdevAdd({ driver: 'null-co', 'node-name': 'mirror-target-root', size: 32 * 1024 * 1024 });
    await qmp.blockdevMirror({ 'job-id': 'mirror-root', device: diskNodeName('root'), target: 'mirror-target-root', sync: 'full', 'auto-dismiss': false });
  });
  const report = await rig.migrate(await rig.plan());
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.equal(rig.source.isAlive, false, 'the source QEMU quit');
  assert.equal((await rig.destination?.vm?.status())?.status, 'running', 'the guest runs on B');
  const before = (await rig.waitForAcks(0)).acks;
  await rig.waitForAcks(5, before);
  const verify = await rig.verify(rig.destination?.vm?.spec.disks ?? []);
  assert.deepEqual(checkVerify(verify, (await rig.waitForAcks(0)).acks), []);
});

// A destination QEMU that dies just before its rollback (killed, crashed) must still be rolled back:
// the rollback sees it gone, not an error, so the source can take its guest back and nothing is left on B.
// Found by the chaos campaign (seed 91642 run 34, seed 26958 run 88): a rollback that asked the dying QEMU
// for its run state failed with "exited during query-status" and left B's half, its image and its directory.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { MigrationRig } from '../support/migration-rig.ts';

let rig: MigrationRig | undefined;
after(() => rig?.cleanup.run());

test('a destination whose QEMU was just killed rolls back as gone, leaving nothing on B', async () => {
  rig = await MigrationRig.start('deathb', { local: [{ id: 'root', sizeMiB: 32 }], shared: [] }, { mode: 'workload', spanMiB: 8 });
  const plan = await rig.plan();
  const destination = new QemuDestination({ hostId: 'B', pool: rig.poolB, vmDir: (vm) => join(rig!.dir, 'runB', vm), address: '127.0.0.1' });
  rig.destination = destination;
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

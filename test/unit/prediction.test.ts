// The prediction's model (src/migration/prediction.ts) on its own: what a user reads in a dry run before pressing
// the button, for each way RAM moves. The figures are chosen so the expected times can be worked out by hand.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { capOf, predictMigration, type GuestRamFacts } from '../../src/migration/prediction.ts';
import { defaultMigrationOptions, type DiskPlan, type MigrationPlan } from '../../src/migration/plan.ts';

const MiB = 1024 * 1024;

function plan(ram: Partial<MigrationPlan['ram']>, disks: Pick<DiskPlan, 'operation' | 'bytesToCopy'>[] = [], options = defaultMigrationOptions): Pick<MigrationPlan, 'disks' | 'ram' | 'options'> {
  return {
    disks: disks as DiskPlan[],
    ram: { memoryMiB: 512, maxDowntimeMs: 300, downtimeLimitsMs: [300], mode: 'live', allowPostcopy: false, compareMemory: false, ...ram },
    options,
  };
}

function guest(dirtyMiBs: number, inUseMiB: number): GuestRamFacts {
  return { dirtyRateBytesPerS: dirtyMiBs * MiB, dirtyRateMethod: 'page-sampling', calcTimeS: 1, inUseBytes: inUseMiB * MiB, inUseBasis: 'test' };
}

const link = (mibs: number): { bytesPerS: number; basis: string } => ({ bytesPerS: mibs * MiB, basis: 'test' });

test('pre-copy that converges: each pass sends what the one before dirtied, and the pause is what is left under the limit', () => {
  // 200 MiB at 100 MiB/s: 2 s, 20 MiB dirtied meanwhile; 0.2 s of it fits under 300 ms.
  const p = predictMigration(plan({}, [{ operation: 'mirror', bytesToCopy: 100 * MiB }, { operation: 'reattach', bytesToCopy: 0 }]), guest(10, 200), link(100));
  assert.equal(p.converges, true);
  assert.equal(p.passes, 3, 'QEMU syncs as RAM starts, after the pass, and once more with the guest stopped');
  assert.equal(p.pauseMs, 200);
  assert.equal(p.totalMs, 1000 + 2000, 'the mirror and the pass at the cap; QEMU sends the rest uncapped, in the pause');
  assert.equal(p.diskBytes, 100 * MiB);

  // 50 MiB/s dirtied: 100 MiB (1 s), then 50 (0.5 s), then 25 (0.25 s, under the limit): three passes while it runs.
  const slower = predictMigration(plan({}), guest(50, 200), link(100));
  assert.equal(slower.converges, true);
  assert.equal(slower.passes, 5);
  assert.equal(slower.pauseMs, 250);
  assert.equal(slower.totalMs, 2000 + 1000 + 500);
});

test('pre-copy that cannot converge says so, and the time is what --timeout-action makes of it', () => {
  const stuck = predictMigration(plan({}, [], { ...defaultMigrationOptions, timeoutS: 60, timeoutAction: 'abort' }), guest(120, 200), link(100));
  assert.equal(stuck.converges, false);
  assert.equal(stuck.passes, undefined);
  assert.equal(stuck.totalMs, 60_000);
  assert.match(stuck.basis.join('\n'), /does not converge/);

  // Paused at the timeout: the guest's whole RAM (its dirtied share caps at its size) moves with it stopped.
  const paused = predictMigration(plan({}, [], { ...defaultMigrationOptions, timeoutS: 60, timeoutAction: 'pause' }), guest(120, 200), link(100));
  assert.equal(paused.converges, false);
  assert.equal(paused.pauseMs, 5120, '512 MiB at 100 MiB/s');
  assert.equal(paused.totalMs, 60_000 + 5120, 'the guest stopped by vmferry: QEMU keeps the cap');
});

test('a TCG guest that runs one pass only pauses for what it dirtied during that pass, whatever --max-downtime says', () => {
  // 128 MiB at 16 MiB/s: 8 s, 32 MiB dirtied meanwhile: at most 2 s paused (QEMU lifts the cap for it).
  const p = predictMigration(plan({ stopAfterFirstPass: true }, [{ operation: 'mirror', bytesToCopy: 32 * MiB }]), guest(4, 128), link(16));
  assert.equal(p.passes, 2);
  assert.equal(p.pauseMs, 2000);
  assert.equal(p.converges, true, 'QEMU stops the guest after the first pass whatever is left');
  assert.equal(p.totalMs, 2000 + 8000);

  const quiet = predictMigration(plan({ stopAfterFirstPass: true }), guest(0, 128), link(16));
  assert.equal(quiet.converges, true);
  assert.equal(quiet.pauseMs, 0);
});

test('stop-and-copy pauses the guest for all of its RAM in use; post-copy for none of it', () => {
  const stopped = predictMigration(plan({ mode: 'stop-and-copy' }), guest(50, 64), link(32));
  assert.equal(stopped.pauseMs, 2000);
  assert.equal(stopped.totalMs, 2000);
  assert.equal(stopped.converges, true);
  const postcopy = predictMigration(plan({ mode: 'postcopy' }), guest(50, 64), link(32));
  assert.equal(postcopy.pauseMs, 0);
  assert.equal(postcopy.converges, true);
});

test('without a bandwidth cap the link is not known: the dry run shows the measured dirty rate and says why no time is given', () => {
  const open = plan({});
  const p = predictMigration(open, guest(7, 100), capOf(open));
  assert.equal(p.totalMs, undefined);
  assert.equal(p.converges, undefined);
  assert.equal(p.dirtyRateBytesPerS, 7 * MiB);
  assert.match(p.basis.join('\n'), /no --bandwidth cap/);
  assert.equal(capOf(plan({ bandwidthMiBs: 16 }))?.bytesPerS, 16 * MiB);
});

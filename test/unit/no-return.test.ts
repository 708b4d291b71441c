// The point-of-no-return rule (src/migration/no-return.ts) on its own: every caller that undoes a
// migration reads it, so each case here is a decision the executor, the controller's recovery and
// an agent settling alone all take the same way.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { postcopyMayHaveBegun, settlement, type DestinationFate, type PostcopyRam } from '../../src/migration/no-return.ts';
import type { MigrationPhase } from '../../src/migration/phases.ts';

const fates: (DestinationFate | undefined)[] = ['guest-ran', 'never-ran', 'gone', 'unknown', undefined];

test('before a resume or post-copy, a fault rolls back whatever the destination says', () => {
  for (const phase of ['preparing', 'mirroring', 'migrating', 'paused-at-switchover'] as MigrationPhase[]) {
    for (const fate of fates) assert.equal(settlement(phase, fate), 'roll-back', `${phase}, ${fate}`);
  }
});

test('once post-copy may have begun the source is never rolled back, whatever the destination and the source say', () => {
  const rams: (PostcopyRam | undefined)[] = ['completed', 'not-completed', undefined];
  for (const phase of ['postcopy-started', 'postcopy-active'] as MigrationPhase[]) {
    for (const fate of fates) {
      for (const ram of rams) assert.notEqual(settlement(phase, fate, ram), 'roll-back', `${phase}, ${fate}, ${ram}`);
    }
  }
  // An unresolved migration's history says post-copy began: its callers pass what the source says of its RAM.
  for (const fate of fates) assert.notEqual(settlement('unresolved', fate, 'not-completed'), 'roll-back');
});

test('post-copy finishes only once the source completed: a guest that ran on the destination finishes, one never continued is continued', () => {
  assert.equal(settlement('postcopy-active', 'guest-ran', 'completed'), 'finish');
  assert.equal(settlement('postcopy-started', 'never-ran', 'completed'), 'resume-destination');
  assert.equal(settlement('postcopy-active', 'guest-ran', 'not-completed'), 'wait', 'pages still only on the source: it must stay');
  assert.equal(settlement('postcopy-active', 'gone', 'completed'), 'wait', 'the destination lost the guest: nobody may guess');
  assert.equal(settlement('postcopy-started', undefined, undefined), 'wait', 'without the source\'s word the pages may still be needed');
});

test('the live rule is unchanged: after resume-sent the destination decides', () => {
  assert.equal(settlement('resume-sent', 'guest-ran'), 'finish');
  assert.equal(settlement('resume-sent', 'never-ran'), 'roll-back');
  assert.equal(settlement('resume-sent', 'gone'), 'roll-back');
  assert.equal(settlement('resume-sent', undefined), 'wait');
  assert.equal(settlement('resume-sent', 'unknown'), 'wait', 'a destination that cannot tell never lets the source run: an operator decides');
});

test('post-copy is read from the whole history, since `unresolved` alone does not say', () => {
  assert.equal(postcopyMayHaveBegun(['migrating', 'paused-at-switchover', 'postcopy-started', 'unresolved']), true);
  assert.equal(postcopyMayHaveBegun(['migrating', 'paused-at-switchover', 'resume-sent', 'unresolved']), false);
});

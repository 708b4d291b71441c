import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConvergenceWatch } from '../../src/migration/convergence.ts';
import type { MigrationInfo } from '../../src/qmp/commands.ts';

/** A query-migrate answer at pass `pass` with `remaining` bytes left. */
function at(pass: number, remaining: number): MigrationInfo {
  return {
    status: 'active',
    ram: { transferred: 0, remaining, total: 1 << 30, duplicate: 0, normal: 0, 'normal-bytes': 0, 'dirty-pages-rate': 0, 'dirty-sync-count': pass, 'page-size': 4096, mbps: 0 },
  };
}

test('a pre-copy that keeps shrinking is left alone', () => {
  const watch = new ConvergenceWatch([75, 150, 300], true);
  for (let pass = 1; pass <= 10; pass++) assert.equal(watch.observe(at(pass, 1e9 / pass)), undefined);
});

test('three passes without a 10% improvement raise the downtime limit one step, then the next, then release auto-converge, then go post-copy', () => {
  const watch = new ConvergenceWatch([75, 150, 300], true);
  const escalations = [];
  for (let pass = 1; pass <= 16; pass++) {
    const escalation = watch.observe(at(pass, 100e6));
    if (escalation) escalations.push({ pass, escalation });
  }
  assert.deepEqual(escalations, [
    { pass: 4, escalation: { action: 'downtime-limit', downtimeLimitMs: 150 } },
    { pass: 7, escalation: { action: 'downtime-limit', downtimeLimitMs: 300 } },
    { pass: 10, escalation: { action: 'auto-converge' } },
    { pass: 13, escalation: { action: 'postcopy' } },
  ]);
});

test('samples within one pass count once; a plan with one limit and no post-copy escalates only to auto-converge', () => {
  const watch = new ConvergenceWatch([300], false);
  const steps = [];
  for (let sample = 0; sample < 40; sample++) {
    const escalation = watch.observe(at(1 + Math.floor(sample / 5), 100e6));
    if (escalation) steps.push({ pass: 1 + Math.floor(sample / 5), escalation });
  }
  assert.deepEqual(steps, [{ pass: 4, escalation: { action: 'auto-converge' } }]);
  const ladder = new ConvergenceWatch([75, 300], false);
  // Pass 1 sets the best; passes 2-4 stall, but each pass is sampled many times.
  const seen = [];
  for (const pass of [1, 1, 2, 2, 2, 3, 3, 4, 4, 4]) {
    const escalation = ladder.observe(at(pass, 100e6));
    if (escalation) seen.push(escalation);
  }
  assert.deepEqual(seen, [{ action: 'downtime-limit', downtimeLimitMs: 300 }]);
});

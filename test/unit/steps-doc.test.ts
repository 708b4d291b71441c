// docs/ARCHITECTURE.md shows the migration's steps; the code's table (migrationSteps) is the one
// definition, and the rule of no-return.ts reads which phases are past the point of no return from it.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { migrationSteps } from '../../src/migration/phases.ts';
import { resumeMayHaveBeenSent, settlement } from '../../src/migration/no-return.ts';
import { architectureDoc, currentStepsTable, stepsTable } from '../../scripts/steps-doc.ts';

test("docs/ARCHITECTURE.md's table of steps is the code's (regenerate: node --import tsx scripts/steps-doc.ts)", () => {
  assert.equal(currentStepsTable(readFileSync(architectureDoc, 'utf8')), stepsTable());
});

test('past the point of no return (a resume may have been sent, or post-copy begun), a fault whose destination cannot answer leaves the source paused; before it, it rolls back', () => {
  const order = migrationSteps.map((s) => s.phase);
  const firstPast = order.findIndex((phase) => resumeMayHaveBeenSent(phase));
  assert.equal(order[firstPast], 'postcopy-started', 'nothing before the continue into post-copy is past the point of no return');
  for (const step of migrationSteps) {
    assert.equal(resumeMayHaveBeenSent(step.phase), step.pastNoReturn, step.phase);
    assert.equal(settlement(step.phase, undefined), step.pastNoReturn ? 'wait' : 'roll-back', step.phase);
  }
  for (const phase of order.slice(firstPast, order.indexOf('completed') + 1)) assert.ok(resumeMayHaveBeenSent(phase), phase);
  assert.equal(settlement('resume-sent', 'guest-ran'), 'finish');
  assert.equal(settlement('postcopy-active', 'gone'), 'wait', 'post-copy never rolls back');
});

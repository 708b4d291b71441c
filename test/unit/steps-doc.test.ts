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

test('from resume-sent on, a fault whose destination cannot answer leaves the source paused; before it, it rolls back', () => {
  const order = migrationSteps.map((s) => s.phase);
  const noReturn = order.indexOf('resume-sent');
  for (const phase of order.slice(0, order.indexOf('completed') + 1)) {
    const past = order.indexOf(phase) >= noReturn;
    assert.equal(resumeMayHaveBeenSent(phase), past, phase);
    assert.equal(settlement(phase, undefined), past ? 'wait' : 'roll-back', phase);
  }
  assert.equal(settlement('unresolved', undefined), 'wait');
  assert.equal(settlement('unresolved', 'guest-ran'), 'finish');
});

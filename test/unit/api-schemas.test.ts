// The schemas an agent checks request bodies with are the same shapes the
// code works with: a field the planner adds reaches the agent checked, or tsc fails here.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Static, TSchema } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { AnnounceSettingsSchema, MigrationOptionsSchema, MigrationPlanSchema } from '../../src/api/agent-types.ts';
import type { AnnounceSettings, MigrationOptions, MigrationPlan } from '../../src/migration/plan.ts';

/** True only when A and B are the same type: every field, its optionality and its type. */
type Equals<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
/** Compiles only when the schema's type is exactly T. */
function sameShape<S extends TSchema, T>(schema: S, same: Equals<Static<S>, T>): S {
  assert.equal(same, true);
  return schema;
}

test('the migration plan, its options and announce settings have one shape: the schema the agent checks equals the type the planner returns', () => {
  for (const schema of [
    sameShape<typeof MigrationPlanSchema, MigrationPlan>(MigrationPlanSchema, true),
    sameShape<typeof MigrationOptionsSchema, MigrationOptions>(MigrationOptionsSchema, true),
    sameShape<typeof AnnounceSettingsSchema, AnnounceSettings>(AnnounceSettingsSchema, true),
  ]) {
    assert.equal(Value.Check(schema, 'garbage'), false);
  }
});

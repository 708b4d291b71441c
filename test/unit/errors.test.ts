// docs/ERRORS.md lists every error code vmferry raises; this keeps the two in step.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { errorCodes, VmferryError } from '../../src/errors.ts';

const doc = readFileSync(new URL('../../docs/ERRORS.md', import.meta.url), 'utf8');
const documented = new Map(
  [...doc.matchAll(/^\| `(VMF_[A-Z_]+)` \| (.+) \|$/gm)].map((m) => [m[1] as string, (m[2] as string).trim()]),
);

test('every error code is documented with its description, and nothing else is', () => {
  assert.deepEqual([...documented.keys()].sort(), Object.keys(errorCodes).sort());
  for (const [code, description] of Object.entries(errorCodes)) assert.equal(documented.get(code), description, code);
});

test('an error keeps its code, message and cause', () => {
  const cause = new Error('socket reset');
  const err = new VmferryError('VMF_QMP_CLOSED', 'QMP connection closed', { cause });
  assert.equal(err.code, 'VMF_QMP_CLOSED');
  assert.equal(err.cause, cause);
  assert.ok(err instanceof Error);
});

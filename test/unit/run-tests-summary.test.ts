// npm test's output ends with a summary that names every failed test's file, its name and its error: a CI
// log that shows only the tail must still say what failed and why (it once showed only the second runner's
// report, and a failure of the first was a name without a message).
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { test } from 'node:test';

const execFile = promisify(execFileCallback);
const root = join(import.meta.dirname, '../..');

test('the summary at the end of run-tests.js names the failed test, its file and its error with the values', async () => {
  // Without NODE_TEST_CONTEXT, which would make the inner runner report to this one instead of printing.
  const { NODE_TEST_CONTEXT: _, ...env } = process.env;
  const run = await execFile(process.execPath, ['scripts/run-tests.js', 'scripts/fixtures/summary-failing.test.ts'], { cwd: root, env }).then(
    () => assert.fail('run-tests.js exits 0 with a failing test'),
    (err: unknown) => err as { code: number; stdout: string },
  );
  assert.equal(run.code, 1);
  const summary = run.stdout.slice(run.stdout.lastIndexOf('# Summary'));
  assert.match(summary, /^✖ scripts\/fixtures\/summary-failing\.test\.ts: a failing test with its own message$/m);
  assert.match(summary, /AssertionError \[ERR_ASSERTION\]: the command exited non-zero/);
  assert.match(summary, /actual: 3\n\s+expected: 0/);
  assert.match(summary, /summary-failing\.test\.ts:10:/, 'where it was thrown');
  assert.doesNotMatch(summary, /a passing neighbour/);
  assert.match(summary, /^\s+[\d.]+ {2}scripts\/fixtures\/summary-failing\.test\.ts$/m, 'the file among the slowest, with its seconds');
});

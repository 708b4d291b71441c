// pollUntil: the one bounded wait for a condition nothing announces.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { pollUntil } from '../../src/util/poll.ts';

test('returns the first value the check gives, asking again until then', async () => {
  let calls = 0;
  assert.equal(await pollUntil(() => (++calls === 3 ? 'ready' : undefined), { timeoutMs: 5_000, intervalMs: 1, timeoutMessage: 'never' }), 'ready');
  assert.equal(calls, 3);
});

test('gives up with VMF_TIMEOUT and the message naming what was last seen', async () => {
  let seen = 0;
  await assert.rejects(
    pollUntil(() => void seen++, { timeoutMs: 30, intervalMs: 5, timeoutMessage: () => `still waiting after ${seen} looks` }),
    (err: unknown) => hasCode(err, 'VMF_TIMEOUT') && /^still waiting after \d+ looks$/.test((err as Error).message) && seen > 1,
  );
});

test('a check that throws ends the poll at once with its error', async () => {
  let calls = 0;
  await assert.rejects(
    pollUntil(
      () => {
        calls++;
        throw new Error('the daemon exited');
      },
      { timeoutMs: 5_000, intervalMs: 1, timeoutMessage: 'never' },
    ),
    /the daemon exited/,
  );
  assert.equal(calls, 1);
});

test('an aborted signal stops the wait between checks', async () => {
  const controller = new AbortController();
  const poll = pollUntil(() => undefined, { timeoutMs: 60_000, intervalMs: 10_000, timeoutMessage: 'never', signal: controller.signal });
  controller.abort();
  await assert.rejects(poll, (err: unknown) => hasCode(err, 'VMF_ABORTED'));
});

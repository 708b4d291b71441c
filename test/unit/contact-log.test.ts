import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ContactLog } from '../../src/agent/contact-log.ts';

test('a half counts as attended while a request runs, and idle from the moment the last one ends', async () => {
  const log = new ContactLog();
  let release: () => void = () => undefined;
  const running = log.during('source:m1', () => new Promise<string>((resolve) => (release = () => resolve('done'))));
  await sleep(30);
  assert.equal(log.idleMs('source:m1'), 0, 'a long wait in flight is contact, however long it lasts');
  release();
  assert.equal(await running, 'done');
  await sleep(30);
  assert.ok(log.idleMs('source:m1') >= 25, `idle ${log.idleMs('source:m1')} ms after the request ended`);
});

test('a failed request still counts as contact; touch restarts the clock; forget drops the half', async () => {
  const log = new ContactLog();
  await assert.rejects(log.during('destination:m2', () => Promise.reject(new Error('QEMU gone'))), /QEMU gone/);
  await sleep(30);
  assert.ok(log.idleMs('destination:m2') >= 25);
  log.touch('destination:m2');
  assert.ok(log.idleMs('destination:m2') < 25);
  log.forget('destination:m2');
  assert.equal(log.idleMs('destination:m2'), 0, 'an unknown half is never idle: nothing to settle');
});

// The chaos campaign's fault proxy: requests pass through unchanged; the one
// armed reply is lost (the agent did the work, the caller sees a reset) or
// late (delivered after the delay), and only once.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { requestJson } from '../../src/http/errors.ts';
import { FaultProxy } from './fault-proxy.ts';

test('the fault proxy forwards, loses one armed reply after the agent acted, and delays another', async () => {
  const handled: string[] = [];
  const agent = createServer((req, res) => {
    handled.push(`${req.method} ${req.url}`);
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ ok: req.url }));
  });
  agent.listen(0, '127.0.0.1');
  await once(agent, 'listening');
  const proxy = await FaultProxy.start(`http://127.0.0.1:${(agent.address() as AddressInfo).port}`, '127.0.0.1');
  try {
    assert.deepEqual(await requestJson(proxy.url, 'POST', '/v1/migrations/m1/destination/resume', { body: {} }), { ok: '/v1/migrations/m1/destination/resume' });

    proxy.arm({ route: '/destination/resume', mode: 'lost', delayMs: 0 });
    await assert.rejects(requestJson(proxy.url, 'POST', '/v1/migrations/m1/destination/resume', { body: {} }), { code: 'VMF_UNREACHABLE' });
    assert.equal(handled.at(-1), 'POST /v1/migrations/m1/destination/resume', 'the agent got the request it never answered for');
    assert.ok(proxy.fired);
    assert.deepEqual(await requestJson(proxy.url, 'POST', '/v1/migrations/m1/destination/resume', { body: {} }), { ok: '/v1/migrations/m1/destination/resume' }, 'one reply only');

    proxy.arm({ route: '/source/continue', mode: 'late', delayMs: 700 });
    const started = Date.now();
    assert.deepEqual(await requestJson(proxy.url, 'POST', '/v1/migrations/m1/source/continue', { body: {} }), { ok: '/v1/migrations/m1/source/continue' });
    assert.ok(Date.now() - started >= 700, 'the reply came late');
    proxy.arm({ route: '/source/continue', mode: 'late', delayMs: 2_000 });
    await assert.rejects(requestJson(proxy.url, 'POST', '/v1/migrations/m1/source/continue', { body: {}, timeoutMs: 300 }), { code: 'VMF_TIMEOUT' });
  } finally {
    await proxy.close();
    agent.close();
  }
});

// Retries between controller and agents: a status poll whose connection is reset is asked again and
// answers; a conflict is an answer, not retried; a switch-over call (continue) is never repeated; a host
// that stays away fails within the policy's count and time.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { AgentClient, RemoteSource } from '../../src/agent/client.ts';
import { retryIdempotent } from '../../src/http/retry.ts';
import { VmferryError } from '../../src/errors.ts';
import { findFreePort } from '../../src/util/ports.ts';
import { FaultProxy } from '../chaos/fault-proxy.ts';

async function fakeAgent(): Promise<{ url: string; handled: string[]; close: () => void }> {
  const handled: string[] = [];
  const server = createServer((req, res) => {
    handled.push(`${req.method} ${req.url}`);
    if (req.url?.includes('busy')) {
      res.writeHead(409, { 'content-type': 'application/json' }).end(JSON.stringify({ code: 'VMF_CONFLICT', message: 'busy' }));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(req.url?.endsWith('/info') ? { status: 'active' } : {}));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, handled, close: () => server.close() };
}

test('a status poll whose connection is reset is retried and answers; continue is not repeated', async () => {
  const agent = await fakeAgent();
  const proxy = await FaultProxy.start(agent.url, '127.0.0.1');
  try {
    const source = new RemoteSource('A', new AgentClient(proxy.url), 'm1');
    proxy.arm({ route: '/source/info', mode: 'reset', delayMs: 0 });
    assert.deepEqual(await source.migrationInfo(AbortSignal.timeout(10_000)), { status: 'active' });
    assert.ok(proxy.fired, 'the first poll was reset');
    assert.deepEqual(agent.handled, ['GET /v1/migrations/m1/source/info'], 'the agent answered the retry');

    // Without the retry the same reset fails the call: what failed a migration before.
    proxy.arm({ route: '/source/info', mode: 'reset', delayMs: 0 });
    await assert.rejects(new AgentClient(proxy.url).request('GET', '/v1/migrations/m1/source/info'), { code: 'VMF_UNREACHABLE' });

    proxy.arm({ route: '/source/continue', mode: 'reset', delayMs: 0 });
    await assert.rejects(source.continueSwitchover(AbortSignal.timeout(10_000)), { code: 'VMF_UNREACHABLE' });
    assert.ok(!agent.handled.some((h) => h.endsWith('/continue')), 'continue was sent once, and that once was lost: never repeated');

    const before = agent.handled.length;
    await assert.rejects(new AgentClient(proxy.url).idempotent('GET', '/v1/busy'), { code: 'VMF_CONFLICT' });
    assert.equal(agent.handled.length, before + 1, "an agent's answer is final, not retried");
  } finally {
    await proxy.close();
    agent.close();
  }
});

test('a host that stays unreachable fails within the bound, naming the call and the tries', async () => {
  const port = await findFreePort('127.0.0.1');
  const started = Date.now();
  let retries = 0;
  const client = new AgentClient(`http://127.0.0.1:${port}`, undefined, 'B');
  await assert.rejects(
    retryIdempotent('GET /v1/host on B', () => client.request('GET', '/v1/host'), { policy: { attempts: 3, firstDelayMs: 50, maxDelayMs: 100, budgetMs: 5_000 }, onRetry: () => retries++ }),
    (err: unknown) => err instanceof VmferryError && err.code === 'VMF_UNREACHABLE' && /GET \/v1\/host on B: .*tried 3 times/.test(err.message),
  );
  assert.equal(retries, 2);
  assert.ok(Date.now() - started < 2_000, 'bounded in time');
  const aborted = new AbortController();
  aborted.abort(new VmferryError('VMF_ABORTED', 'cancelled by the test'));
  await assert.rejects(client.idempotent('GET', '/v1/host', undefined, { signal: aborted.signal }), { code: 'VMF_ABORTED' });
});

// Every timeout reaches users as VMF_TIMEOUT naming what timed out, never as an internal error.
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { requestJson } from '../../src/http/errors.ts';
import { raceAbort, timeoutSignal } from '../../src/util/abort.ts';

test('a timeout signal aborts with VMF_TIMEOUT naming what did not finish', async () => {
  // Like AbortSignal.timeout's, its timer does not hold the process: something else must, as a server does.
  const alive = setInterval(() => undefined, 1_000);
  const never = new Promise<never>(() => undefined);
  await assert.rejects(raceAbort(never, timeoutSignal('the resume on B', 50), 'the resume'), (err: unknown) => hasCode(err, 'VMF_TIMEOUT') && /the resume on B did not finish within 50 ms/.test(String(err)));
  clearInterval(alive);
});

test('a server that sends its headers and then stalls the body: the client gets VMF_TIMEOUT, not an internal error', async () => {
  const server = createServer((_request, response) => {
    response.writeHead(200, { 'content-type': 'application/json' });
    response.write('{"partial":');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  try {
    await assert.rejects(requestJson(url, 'GET', '/v1/hosts', { timeoutMs: 300 }), (err: unknown) => hasCode(err, 'VMF_TIMEOUT') && String(err).includes('/v1/hosts'));
  } finally {
    server.closeAllConnections();
    server.close();
  }
});

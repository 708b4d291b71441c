// docs/ERRORS.md lists every error code vmferry raises; this keeps the two in step.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import Fastify from 'fastify';
import { errorCodes, VmferryError, type ErrorCode } from '../../src/errors.ts';
import { installErrorHandler, requestJson } from '../../src/http/errors.ts';

const doc = readFileSync(new URL('../../docs/ERRORS.md', import.meta.url), 'utf8');
const documented = new Map(
  [...doc.matchAll(/^\| `(VMF_[A-Z_]+)` \| (\d{3}) \| (.+) \|$/gm)].map((m) => [m[1] as string, { status: Number(m[2]), meaning: (m[3] as string).trim() }]),
);

test('every error code is documented with its HTTP status and meaning, and nothing else is', () => {
  assert.deepEqual([...documented.keys()].sort(), Object.keys(errorCodes).sort());
  for (const [code, kind] of Object.entries(errorCodes)) assert.deepEqual(documented.get(code), { status: kind.status, meaning: kind.meaning }, code);
});

test('a server answers every code with its registered status, and the client gets the same code back', async () => {
  const app = Fastify({ logger: false });
  installErrorHandler(app);
  app.get<{ Params: { code: ErrorCode } }>('/fail/:code', (request) => {
    throw new VmferryError(request.params.code, `failing with ${request.params.code}`);
  });
  const url = await app.listen({ host: '127.0.0.1', port: 0 });
  try {
    for (const [code, { status }] of Object.entries(errorCodes)) {
      const response = await fetch(`${url}/fail/${code}`);
      assert.equal(response.status, status, `${code} answered with HTTP ${response.status}`);
      await assert.rejects(requestJson(url, 'GET', `/fail/${code}`), (err: unknown) => err instanceof VmferryError && err.code === code);
    }
  } finally {
    await app.close();
  }
});

// HTTP API fuzzing against the real daemons (storage server, controller and one
// agent, each its own process through the CLI): every route each server's
// OpenAPI document lists gets wrong types, missing and extra fields, huge and
// deeply nested bodies, path-like and oversized names, unknown ids, wrong
// content types and broken JSON. Every answer must be a 4xx JSON error naming
// the problem, in time; the daemons must stay up; and nothing may appear on
// disk or in their inventories because of a rejected request.
//
// Reproduce a run with FUZZ_SEED=<seed printed by the test>.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { after, before, test } from 'node:test';
import { findFreePort } from '../../src/util/ports.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';
import { Daemon } from './daemon.ts';
import { fuzzSeed, Rng } from './prng.ts';

const seed = fuzzSeed();
const requestTimeoutMs = 15_000;

interface Server {
  target: 'storage admin API' | 'controller API' | 'agent API';
  url: string;
  daemon: Daemon;
}

let dir: { path: string; remove(): Promise<void> };
const servers: Server[] = [];
let filesBefore: Set<string>;

async function listFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (at: string): Promise<void> => {
    for (const entry of await readdir(at, { withFileTypes: true })) {
      const path = join(at, entry.name);
      out.push(relative(root, path));
      if (entry.isDirectory()) await walk(path);
    }
  };
  await walk(root);
  return out.sort();
}

/** SQLite's journal files come and go with any write; everything else is a real file. */
const ignoredFile = (path: string): boolean => /\.db-(wal|shm|journal)$/.test(path) || /\.log$/.test(path);

before(async () => {
  console.log(`# API fuzz seed ${seed} (rerun with FUZZ_SEED=${seed})`);
  dir = await makeTempDir('api-fuzz');
  const [storagePort, storageNbdPort, controllerPort, agentPort] = await Promise.all([0, 1, 2, 3].map(() => findFreePort('127.0.0.1')));
  const storageUrl = `http://127.0.0.1:${storagePort}`;
  const controllerUrl = `http://127.0.0.1:${controllerPort}`;
  const agentUrl = `http://127.0.0.1:${agentPort}`;
  const answers = (url: string) => async () => (await fetch(url, { signal: AbortSignal.timeout(2_000) })).ok;
  servers.push({
    target: 'storage admin API',
    url: storageUrl,
    daemon: await Daemon.start('storage server', ['storage', 'serve', '--data-dir', join(dir.path, 'storage'), '--listen', `127.0.0.1:${storageNbdPort}`, '--admin', `127.0.0.1:${storagePort}`, '--insecure'], answers(`${storageUrl}/v1/volumes`)),
  });
  servers.push({
    target: 'controller API',
    url: controllerUrl,
    daemon: await Daemon.start('controller', ['controller', '--listen', `127.0.0.1:${controllerPort}`, '--db', join(dir.path, 'controller.db'), '--insecure'], answers(`${controllerUrl}/v1/hosts`)),
  });
  servers.push({
    target: 'agent API',
    url: agentUrl,
    daemon: await Daemon.start('agent', ['--controller', controllerUrl, 'agent', '--host-id', 'A', '--listen', `127.0.0.1:${agentPort}`, '--data-dir', join(dir.path, 'agent'), '--accel', 'tcg', '--insecure'], async () => {
      const hosts = (await (await fetch(`${controllerUrl}/v1/hosts`, { signal: AbortSignal.timeout(2_000) })).json()) as { id: string }[];
      return hosts.some((h) => h.id === 'A');
    }),
  });
  // Something for "exists" paths to find, so a bad request cannot hide behind a 404.
  const created = await fetch(`${storageUrl}/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'keep', sizeBytes: 1048576 }) });
  assert.equal(created.status, 201);
  filesBefore = new Set((await listFiles(dir.path)).filter((f) => !ignoredFile(f)));
});

after(async () => {
  for (const server of servers.reverse()) await server.daemon.stop();
  await dir?.remove();
});

// ---- Routes, from each server's own OpenAPI document ------------------------

interface JsonSchema {
  type?: string | string[];
  properties?: Record<string, JsonSchema>;
  required?: string[];
  additionalProperties?: boolean | JsonSchema;
  items?: JsonSchema;
  anyOf?: JsonSchema[];
  pattern?: string;
  enum?: unknown[];
  const?: unknown;
}

interface Route {
  method: string;
  path: string;
  params: string[];
  query: Record<string, JsonSchema>;
  body: JsonSchema | undefined;
}

async function routes(server: Server): Promise<Route[]> {
  const doc = (await (await fetch(`${server.url}/openapi.json`)).json()) as {
    paths: Record<string, Record<string, { parameters?: { in: string; name: string; schema: JsonSchema }[]; requestBody?: { content: Record<string, { schema: JsonSchema }> } }>>;
  };
  return Object.entries(doc.paths).flatMap(([path, operations]) =>
    Object.entries(operations).map(([method, op]) => ({
      method: method.toUpperCase(),
      path,
      params: (op.parameters ?? []).filter((p) => p.in === 'path').map((p) => p.name),
      query: Object.fromEntries((op.parameters ?? []).filter((p) => p.in === 'query').map((p) => [p.name, p.schema])),
      body: op.requestBody?.content['application/json']?.schema,
    })),
  );
}

// ---- Inputs ----------------------------------------------------------------

/** Names a path parameter must refuse (400): traversal, separators, NUL, encodings, oversize. */
const badNames = ['..', '../x', '..%2Fx', 'a%2Fb', '%2e%2e', '%2e%2e%2fetc', '%00', 'x%00y', 'A'.repeat(5000), '%20', 'x%0Ay', '%C0%AE%C0%AE', '~', 'x*'];
/** Valid-looking ids nothing has: 404 (or an idempotent no-op). */
const unknownIds = ['nope', 'zz-unknown-1', 'a'.repeat(63)];

function wrongValues(schema: JsonSchema | undefined): unknown[] {
  const type = Array.isArray(schema?.type) ? schema.type[0] : schema?.type;
  switch (type) {
    case 'string':
      return [123, true, null, [], {}, ''];
    case 'integer':
      return ['1', 1.5, -1, 2 ** 64, null, true, []];
    case 'number':
      return ['x', null, -1e308, [], {}];
    case 'boolean':
      return ['true', 1, null, []];
    case 'array':
      return [{}, 'x', 1, null];
    case 'object':
      return [[], 'x', 1, null];
    default:
      return [];
  }
}

/** A value that satisfies the schema as far as the fuzzer cares; mutations then break one field. */
function sample(schema: JsonSchema | undefined, key = ''): unknown {
  if (!schema) return null;
  if (schema.const !== undefined) return schema.const;
  if (schema.enum) return schema.enum[0];
  if (schema.anyOf?.length) return sample(schema.anyOf[0], key);
  const type = Array.isArray(schema.type) ? schema.type[0] : schema.type;
  switch (type) {
    case 'string':
      if (schema.pattern?.startsWith('^/')) return '/fz';
      return key === 'url' ? 'http://127.0.0.1:1' : key === 'uri' ? 'tcp:127.0.0.1:1' : 'fz';
    case 'integer':
    case 'number':
      return key === 'sizeBytes' ? 1048576 : 1;
    case 'boolean':
      return false;
    case 'array':
      return [];
    case 'object':
      return Object.fromEntries(Object.entries(schema.properties ?? {}).filter(([k]) => schema.required?.includes(k)).map(([k, v]) => [k, sample(v, k)]));
    default:
      return {};
  }
}

interface Probe {
  what: string;
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
  /** Which answers are right: 'reject' = a 4xx naming `names`; 'unknown' = 404 or a harmless 2xx. */
  expect: 'reject' | 'unknown';
  names?: RegExp;
  /** The server may answer (413) and close before the whole body is sent; the client then sees EPIPE. */
  mayCloseEarly?: boolean;
}

function fillPath(route: Route, value: (param: string) => string): string {
  return route.path.replace(/\{([^}]+)\}/g, (_, param: string) => value(param));
}

const json = { 'content-type': 'application/json' };

function probesFor(route: Route, rng: Rng): Probe[] {
  const probes: Probe[] = [];
  // Routes with a body act on something that exists; body-less ones (DELETE…) get an unknown id,
  // since a body they ignore must not stop them from doing their job.
  const okPath = fillPath(route, (p) => (p === 'name' && route.body ? 'keep' : p === 'name' ? 'nope-x' : 'fz1'));
  const validBody = route.body ? JSON.stringify(sample(route.body)) : undefined;
  const withBody = (body: string | Buffer | undefined, headers: Record<string, string> = json) => (body === undefined ? {} : { body, headers });
  for (const param of route.params) {
    for (const bad of badNames) {
      probes.push({ what: `${param}=${bad.slice(0, 20)}`, method: route.method, path: fillPath(route, (p) => (p === param ? bad : 'keep')), ...withBody(validBody), expect: 'reject', names: new RegExp(`${param}|route|url`) });
    }
    for (const unknown of unknownIds) probes.push({ what: `unknown ${param}`, method: route.method, path: fillPath(route, () => unknown), ...withBody(validBody), expect: 'unknown' });
  }
  for (const [name, schema] of Object.entries(route.query)) {
    for (const bad of ['maybe', '-1', '1e400', '', '%00', 'x'.repeat(5000)]) {
      if (schema.type === 'boolean' && bad === '') continue;
      probes.push({ what: `?${name}=${bad.slice(0, 10)}`, method: route.method, path: `${okPath}?${name}=${bad}`, ...withBody(validBody), expect: 'reject', names: new RegExp(name) });
    }
  }
  // An unknown query parameter is ignored by design (HTTP caches and proxies add some): no case.
  if (route.body) {
    const base = sample(route.body) as Record<string, unknown>;
    const schema = route.body;
    for (const whole of [[], 'x', 1, null, true]) probes.push({ what: `body ${JSON.stringify(whole)}`, method: route.method, path: okPath, ...withBody(JSON.stringify(whole)), expect: 'reject', names: /body/ });
    for (const key of schema.required ?? []) {
      const { [key]: _, ...rest } = base;
      probes.push({ what: `without ${key}`, method: route.method, path: okPath, ...withBody(JSON.stringify(rest)), expect: 'reject', names: new RegExp(key) });
    }
    for (const [key, propSchema] of Object.entries(schema.properties ?? {})) {
      for (const wrong of wrongValues(propSchema)) {
        probes.push({ what: `${key}=${JSON.stringify(wrong)}`, method: route.method, path: okPath, ...withBody(JSON.stringify({ ...base, [key]: wrong })), expect: 'reject', names: new RegExp(key) });
      }
      if (propSchema.type === 'string') {
        for (const bad of ['../x', 'a/b', 'x\u0000y', '%2e%2e', 'A'.repeat(100_000).slice(0, rng.int(300, 60_000))]) {
          // Free-text fields (an export name, an address) may legitimately hold these; only pattern-checked ones must refuse.
          if (!propSchema.pattern) continue;
          probes.push({ what: `${key}=${JSON.stringify(bad.slice(0, 12))}`, method: route.method, path: okPath, ...withBody(JSON.stringify({ ...base, [key]: bad })), expect: 'reject', names: new RegExp(key) });
        }
      }
    }
    probes.push({ what: 'an extra field', method: route.method, path: okPath, ...withBody(JSON.stringify({ ...base, fuzzExtra: 1 })), expect: 'reject', names: /fuzzExtra|additional/ });
    probes.push({ what: '__proto__ field', method: route.method, path: okPath, ...withBody(`{"__proto__": {"polluted": 1}, ${JSON.stringify(base).slice(1)}`), expect: 'reject', names: /proto|additional|JSON/ });
    probes.push({ what: 'constructor.prototype field', method: route.method, path: okPath, ...withBody(JSON.stringify({ ...base, constructor: { prototype: { polluted: 1 } } })), expect: 'reject', names: /constructor|additional|JSON/ });
  }
  if (route.method !== 'GET') {
    // Broken bodies, on every non-GET route, body schema or not: a route that takes no body may
    // ignore one it cannot parse (then the answer is about the path, e.g. a 404), but never a 5xx.
    const bodyExpect = route.body ? 'reject' : 'unknown';
    const big = `{"pad":"${'x'.repeat(10 * 1024 * 1024)}"}`;
    const deepArray = `${'['.repeat(50_000)}${']'.repeat(50_000)}`;
    const deepObject = `${'{"a":'.repeat(20_000)}1${'}'.repeat(20_000)}`;
    probes.push({ what: '10 MiB JSON', method: route.method, path: okPath, ...withBody(big), expect: bodyExpect, names: /too large|body/, mayCloseEarly: true });
    probes.push({ what: 'arrays nested 50,000 deep', method: route.method, path: okPath, ...withBody(deepArray), expect: bodyExpect, names: /body|large|JSON|deep/ });
    probes.push({ what: 'objects nested 20,000 deep', method: route.method, path: okPath, ...withBody(deepObject), expect: bodyExpect, names: /body|large|JSON|deep|additional|a\b/ });
    for (const broken of ['{', '{"a":1,}', "{'a':1}", '\u0000', 'null null', '{"a":"\\ud800"', '\uFEFF{}', '1e99999']) {
      // A byte order mark before "{}" is {} to a parser that ignores it (RFC 8259 section 8.1 allows that): only a
      // body schema that requires a field must refuse it.
      const empty = broken === '\uFEFF{}' && route.body && !(route.body.required?.length);
      probes.push({ what: `invalid JSON ${JSON.stringify(broken)}`, method: route.method, path: okPath, ...withBody(broken), expect: empty ? 'unknown' : bodyExpect, names: /JSON|body|Unexpected|Body/ });
    }
    for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/xml']) {
      probes.push({ what: `content-type ${type}`, method: route.method, path: okPath, ...withBody(validBody ?? '{}', { 'content-type': type }), expect: bodyExpect, names: /content-type|media type|charset|body must be object/i });
    }
    // JSON is UTF-8 (RFC 8259): the same body really encoded as UTF-16 must not parse.
    probes.push({ what: 'a UTF-16 body', method: route.method, path: okPath, ...withBody(Buffer.from(validBody ?? '{}', 'utf16le'), { 'content-type': 'application/json; charset=utf-16' }), expect: bodyExpect, names: /JSON|charset|body/i });
    probes.push({ what: 'random bytes as JSON', method: route.method, path: okPath, ...withBody(rng.bytes(rng.int(1, 4096))), expect: bodyExpect, names: /./ });
  }
  return probes;
}

// ---- Running and judging ----------------------------------------------------

async function send(server: Server, probe: Probe): Promise<{ status: number; contentType: string; text: string } | string> {
  try {
    const response = await fetch(`${server.url}${probe.path}`, {
      method: probe.method,
      headers: probe.headers ?? {},
      body: probe.body ?? null,
      signal: AbortSignal.timeout(requestTimeoutMs),
    });
    return { status: response.status, contentType: response.headers.get('content-type') ?? '', text: await response.text() };
  } catch (err) {
    // A server that closes the connection on a 10 MiB body without answering is still "no answer".
    return `no answer: ${(err as Error & { cause?: Error }).cause?.message ?? (err as Error).message}`;
  }
}

function judge(probe: Probe, answer: { status: number; contentType: string; text: string }): string | undefined {
  if (answer.status >= 500) return `HTTP ${answer.status}: ${answer.text.slice(0, 300)}`;
  let body: { code?: unknown; message?: unknown } | undefined;
  try {
    body = answer.text ? (JSON.parse(answer.text) as typeof body) : undefined;
  } catch {
    body = undefined;
  }
  if (probe.expect === 'unknown') {
    if (answer.status < 300) return undefined;
    if (answer.status >= 500) return `HTTP ${answer.status} for an unknown id`;
  } else if (answer.status < 400) {
    return `accepted with HTTP ${answer.status}: ${answer.text.slice(0, 200)}`;
  }
  if (!answer.contentType.startsWith('application/json') || typeof body?.code !== 'string' || typeof body.message !== 'string' || body.message === '') {
    return `HTTP ${answer.status} without a JSON error (${answer.contentType}): ${answer.text.slice(0, 200)}`;
  }
  if (!body.code.startsWith('VMF_')) return `error code ${body.code} is not a vmferry code`;
  if (probe.expect === 'reject' && probe.names && !probe.names.test(body.message)) return `HTTP ${answer.status} "${body.message.slice(0, 200)}" does not name the problem (${probe.names})`;
  return undefined;
}

test('every route of the storage, controller and agent APIs refuses bad input with a 4xx that names it', { timeout: 120_000 }, async () => {
  const budgetMs = 60_000;
  const started = Date.now();
  const failures: string[] = [];
  const counts = new Map<string, { routes: number; probes: number; statuses: Map<number, number> }>();
  for (const server of servers) {
    const rss = server.daemon.rssMiB();
    const list = await routes(server);
    assert.ok(list.length > 0, `${server.target} lists no routes`);
    const tally = { routes: list.length, probes: 0, statuses: new Map<number, number>() };
    counts.set(server.target, tally);
    for (const [index, route] of list.entries()) {
      const probes = probesFor(route, new Rng(seed, server.target, index));
      // Four at a time: concurrency finds races, and keeps the whole run within its budget.
      for (let at = 0; at < probes.length && Date.now() - started < budgetMs; at += 4) {
        await Promise.all(
          probes.slice(at, at + 4).map(async (probe) => {
            const answer = await send(server, probe);
            tally.probes++;
            const closedEarly = typeof answer === 'string' && probe.mayCloseEarly === true && /EPIPE|ECONNRESET|other side closed/.test(answer);
            const problem = closedEarly ? undefined : typeof answer === 'string' ? answer : judge(probe, answer);
            if (typeof answer !== 'string') tally.statuses.set(answer.status, (tally.statuses.get(answer.status) ?? 0) + 1);
            if (problem) failures.push(`${server.target} ${route.method} ${route.path} with ${probe.what}: ${problem}`);
          }),
        );
      }
      assert.ok(server.daemon.alive, `${server.daemon.name} exited after ${route.method} ${route.path}:\n${server.daemon.log()}`);
    }
    const rssAfter = server.daemon.rssMiB();
    const mine = failures.filter((f) => f.startsWith(server.target));
    const statuses = [...tally.statuses.entries()].sort((a, b) => a[0] - b[0]).map(([status, n]) => `${n}×${status}`).join(' ');
    recordReliability(import.meta.url, {
      kind: 'bad-input',
      target: server.target,
      tried: `${tally.probes} bad requests over all ${tally.routes} routes of its OpenAPI document: wrong types, missing/extra/__proto__ fields, 10 MiB and 50,000-deep bodies, ../x, a%2Fb, %2e%2e, NUL and 5000-char names, unknown ids, wrong content types, invalid JSON; seed ${seed}`,
      observed: `${mine.length === 0 ? 'every answer a 4xx JSON error naming the problem (unknown ids: 404 or an idempotent no-op)' : `${mine.length} wrong answers, e.g. ${mine[0]}`}: ${statuses}; server stayed up, RSS ${rss.toFixed(0)}→${rssAfter.toFixed(0)} MiB`,
      ok: mine.length === 0,
    });
  }
  if (process.env.FUZZ_DUMP) writeFileSync(process.env.FUZZ_DUMP, failures.join('\n'));
  assert.deepEqual(failures.slice(0, 40), [], `${failures.length} bad answers`);
});

// The generic probes above stop at a body's top-level fields; a mirror target is nested, and
// used to pass unchecked (Type.Unknown) into blockdev-add.
test('agent API: source/mirrors refuses malformed mirror targets with a 400 naming the field', async () => {
  const agent = servers[2] as Server;
  const good = { diskId: 'root', sync: 'full', server: { type: 'inet', host: '127.0.0.1', port: 10809 }, exportName: 'root', tls: false };
  const { server: _, ...withoutServer } = good;
  const cases: [string, unknown, RegExp][] = [
    ['a string', 'root', /targets\/0 must be object/],
    ['no server', withoutServer, /targets\/0 must have required property 'server'/],
    ['server type "tcp"', { ...good, server: { type: 'tcp', host: '127.0.0.1', port: 10809 } }, /targets\/0\/server/],
    ['port 0', { ...good, server: { type: 'inet', host: '127.0.0.1', port: 0 } }, /targets\/0\/server/],
    ['port "10809"', { ...good, server: { type: 'inet', host: '127.0.0.1', port: '10809' } }, /targets\/0\/server/],
    ['a relative unix socket path', { ...good, server: { type: 'unix', path: 'nbd.sock' } }, /targets\/0\/server/],
    ['sync "incremental"', { ...good, sync: 'incremental' }, /targets\/0\/sync/],
    ['diskId "../x"', { ...good, diskId: '../x' }, /targets\/0\/diskId/],
    ['exportName 123', { ...good, exportName: 123 }, /targets\/0\/exportName/],
    ['an extra field', { ...good, node: 'x' }, /targets\/0 must NOT have additional properties/],
  ];
  const wrong: string[] = [];
  for (const [what, target, names] of cases) {
    const response = await fetch(`${agent.url}/v1/migrations/m1/source/mirrors`, {
      method: 'POST',
      headers: json,
      body: JSON.stringify({ targets: [target], copyMode: 'background' }),
      signal: AbortSignal.timeout(requestTimeoutMs),
    });
    const body = (await response.json()) as { code?: string; message?: string };
    if (response.status !== 400 || body.code !== 'VMF_INVALID_ARGUMENT' || !names.test(body.message ?? '')) wrong.push(`${what}: HTTP ${response.status} ${JSON.stringify(body)}`);
  }
  // What a destination's prepare really hands out passes the schema: the answer is about the unknown migration.
  const accepted = await fetch(`${agent.url}/v1/migrations/m1/source/mirrors`, {
    method: 'POST',
    headers: json,
    body: JSON.stringify({ targets: [good, { ...good, diskId: 'data', sync: 'top', server: { type: 'unix', path: '/run/nbd.sock' } }], copyMode: 'write-blocking' }),
    signal: AbortSignal.timeout(requestTimeoutMs),
  });
  const acceptedBody = (await accepted.json()) as { code?: string };
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'agent API',
    tried: `POST /v1/migrations/ID/source/mirrors with malformed targets: ${cases.map(([what]) => what).join(', ')}`,
    observed: wrong.length === 0 ? `each a 400 VMF_INVALID_ARGUMENT naming the field (e.g. body/targets/0/sync); well-formed targets reach the handler (${accepted.status} ${acceptedBody.code}) (was: any JSON accepted and cast to MirrorTarget)` : `${wrong.length} wrong answers, e.g. ${wrong[0]}`,
    ok: wrong.length === 0,
  });
  assert.deepEqual(wrong, []);
  assert.equal(accepted.status, 404, JSON.stringify(acceptedBody));
  assert.equal(acceptedBody.code, 'VMF_NOT_FOUND');
});

test('nothing was created by the rejected requests, and every server still serves', async () => {
  const [storage, controller, agent] = servers as [Server, Server, Server];
  const volumes = (await (await fetch(`${storage.url}/v1/volumes`)).json()) as { name: string }[];
  const hosts = (await (await fetch(`${controller.url}/v1/hosts`)).json()) as { id: string }[];
  const vms = (await (await fetch(`${agent.url}/v1/vms`)).json()) as unknown[];
  const migrations = (await (await fetch(`${controller.url}/v1/migrations`)).json()) as unknown[];
  const added = (await listFiles(dir.path)).filter((f) => !ignoredFile(f) && !filesBefore.has(f));
  const ok = volumes.map((v) => v.name).join() === 'keep' && hosts.map((h) => h.id).join() === 'A' && vms.length === 0 && migrations.length === 0 && added.length === 0;
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'storage admin API',
    tried: 'after every bad request: inventories and files of the storage server, controller and agent',
    observed: ok ? 'no volume, host, VM, migration or file was created by a rejected request; all three daemons still answer' : `left behind: volumes ${volumes.map((v) => v.name).join()}, hosts ${hosts.map((h) => h.id).join()}, ${vms.length} VMs, ${migrations.length} migrations, files ${added.join(', ')}`,
    ok,
  });
  assert.deepEqual(volumes.map((v) => v.name), ['keep']);
  assert.deepEqual(hosts.map((h) => h.id), ['A']);
  assert.deepEqual(vms, []);
  assert.deepEqual(migrations, []);
  assert.deepEqual(added, [], 'files created by rejected requests');
  for (const server of servers) assert.ok(server.daemon.alive, `${server.daemon.name} is gone`);
});

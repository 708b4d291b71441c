// Mutual TLS and roles on every route of every vmferry HTTP API (in-process
// controller, agent and storage admin API, real HTTPS). The routes come from
// each server's own /openapi.json, so a route added later is checked too.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:tls';
import { after, before, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { buildAgent } from '../../src/agent/server.ts';
import { buildController } from '../../src/controller/server.ts';
import { ControllerClient } from '../../src/controller/client.ts';
import { AgentClient } from '../../src/agent/client.ts';
import { requestJson } from '../../src/http/errors.ts';
import { hasCode } from '../../src/errors.ts';
import type { Role } from '../../src/security/identity.ts';
import { identityDir, initCa, issueCertificate } from '../../src/security/pki.ts';
import { loadTlsIdentity, type TlsIdentity } from '../../src/security/tls-files.ts';
import { StorageServer } from '../../src/storage/server.ts';

type ServerName = 'agent' | 'controller' | 'storage';

/** Who may call what, as docs/SECURITY.md promises it (written out here, not read from the code under test). */
function allowed(server: ServerName, method: string, path: string): Role[] {
  // Monitoring: any certificate of the cluster, on every server (a storage certificate is a server's only: it never calls).
  if (method === 'GET' && (path === '/healthz' || path === '/metrics')) return ['controller', 'agent', 'operator'];
  if (server === 'agent') return ['controller'];
  if (server === 'storage') return ['controller', 'agent'];
  return method === 'POST' && path === '/v1/hosts/heartbeat' ? ['agent'] : ['operator'];
}

let dir: string;
const clients = {} as Record<'controller' | 'agentA' | 'operator' | 'rogueOperator' | 'rogueController' | 'rogueAgent', TlsIdentity>;
let caPem: string;
let agent: FastifyInstance;
/** Host B's agent: a real member of the cluster, at another address than A's. */
let agentB: FastifyInstance;
let agentBUrl: string;
let controller: FastifyInstance;
let storage: StorageServer;
const urls = {} as Record<ServerName, string>;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-tls-'));
  const pki = join(dir, 'pki');
  const rogue = join(dir, 'rogue');
  await initCa(pki);
  await initCa(rogue);
  const issued = async (ca: string, role: Role, id: string, end: 'server' | 'client'): Promise<TlsIdentity> => {
    await issueCertificate(ca, { role, id, force: true });
    const tls = loadTlsIdentity({ pkiDir: identityDir(ca, role, id) }, end);
    assert.ok(tls);
    return tls;
  };
  const storageTls = await issued(pki, 'storage', 'storage', 'server');
  const controllerTls = await issued(pki, 'controller', 'controller', 'server');
  const agentTls = await issued(pki, 'agent', 'A', 'server');
  const agentBTls = await issued(pki, 'agent', 'B', 'server');
  clients.controller = controllerTls;
  clients.agentA = agentTls;
  clients.operator = await issued(pki, 'operator', 'alice', 'client');
  // The same roles from another CA: each presented with the cluster's CA trusted, so only the server's check can refuse them.
  for (const [name, role, id] of [['rogueOperator', 'operator', 'alice'], ['rogueController', 'controller', 'controller'], ['rogueAgent', 'agent', 'A']] as const) {
    clients[name] = { ...(await issued(rogue, role, id, 'client')), ca: controllerTls.ca };
  }
  caPem = controllerTls.ca;

  const logger = pino({ level: 'silent' });
  storage = await StorageServer.start({ dataDir: join(dir, 'storage'), logger, admin: { host: '127.0.0.1', port: 0 }, tls: storageTls });
  urls.storage = storage.addresses.adminUrl as string;
  agent = (await buildAgent({ hostId: 'A', dataDir: join(dir, 'agent'), address: '127.0.0.1', logger, storageUrl: urls.storage, tls: agentTls })).app;
  urls.agent = await agent.listen({ host: '127.0.0.1', port: 0 });
  agentB = (await buildAgent({ hostId: 'B', dataDir: join(dir, 'agent-b'), address: '127.0.0.1', logger, tls: agentBTls })).app;
  agentBUrl = await agentB.listen({ host: '127.0.0.1', port: 0 });
  controller = (await buildController({ dbPath: join(dir, 'controller.db'), logger, tls: controllerTls })).app;
  urls.controller = await controller.listen({ host: '127.0.0.1', port: 0 });
  await requestJson(urls.controller, 'POST', '/v1/hosts/heartbeat', { body: { id: 'A', url: urls.agent, address: '127.0.0.1' }, tls: clients.agentA });
});

after(async () => {
  await agent?.close();
  await agentB?.close();
  await controller?.close();
  await storage?.close();
  await rm(dir, { recursive: true, force: true });
});

interface Route {
  server: ServerName;
  method: string;
  /** With every {parameter} filled in. */
  path: string;
  pattern: string;
}

async function routes(server: ServerName, reader: TlsIdentity): Promise<Route[]> {
  const spec = await requestJson<{ paths: Record<string, Record<string, unknown>> }>(urls[server], 'GET', '/openapi.json', { tls: reader });
  return Object.entries(spec.paths).flatMap(([pattern, methods]) =>
    Object.keys(methods).map((method) => ({ server, method: method.toUpperCase(), pattern, path: pattern.replace(/\{[^}]+\}/g, 'x1') })),
  );
}

async function allRoutes(): Promise<Route[]> {
  const list = [...(await routes('agent', clients.controller)), ...(await routes('controller', clients.operator)), ...(await routes('storage', clients.controller))];
  // A server whose document lost its routes would make every check below pass vacuously.
  for (const server of ['agent', 'controller', 'storage'] as const) assert.ok(list.filter((r) => r.server === server).length >= 10, `${server} lists its routes`);
  return list;
}

function bodyOf(method: string): string | undefined {
  return method === 'GET' || method === 'DELETE' ? undefined : '{}';
}

/**
 * Sends the route's request over a TLS connection with exactly these settings;
 * resolves with what came back: the HTTP bytes, and the TLS error the
 * connection ended with. (TLS 1.3 finishes the client's side of the handshake
 * before the server has checked its certificate: the refusal arrives as an
 * alert instead of the first reply.)
 */
function rawRequest(route: Route, options: { ca: string; cert?: string; key?: string }): Promise<{ reply: string; error: string | undefined }> {
  const url = new URL(urls[route.server]);
  return new Promise((resolve) => {
    let reply = '';
    let error: string | undefined;
    const socket = connect({ host: url.hostname, port: Number(url.port), ...options });
    socket.on('secureConnect', () => {
      const body = bodyOf(route.method) ?? '';
      socket.write(`${route.method} ${route.path} HTTP/1.1\r\nhost: ${url.host}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
    });
    socket.on('data', (chunk: Buffer) => (reply += chunk.toString()));
    socket.on('error', (err: NodeJS.ErrnoException) => (error = err.code ?? err.message));
    socket.on('close', () => resolve({ reply, error }));
  });
}

test('every route refuses a client without a certificate at the handshake', async () => {
  for (const route of await allRoutes()) {
    const { reply, error } = await rawRequest(route, { ca: caPem });
    assert.equal(reply, '', `${route.method} ${route.path} on the ${route.server} answered`);
    assert.equal(error, 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED', `${route.method} ${route.path} on the ${route.server}`);
  }
});

test('every route refuses a certificate from another CA at the handshake, whatever role it names', async () => {
  const rogues = [clients.rogueOperator, clients.rogueController, clients.rogueAgent];
  for (const [i, route] of (await allRoutes()).entries()) {
    const rogue = rogues[i % rogues.length] as TlsIdentity;
    const { reply, error } = await rawRequest(route, { ca: caPem, cert: rogue.cert, key: rogue.key });
    assert.equal(reply, '', `${route.method} ${route.path} on the ${route.server} answered`);
    // Node checks the chain of a client's certificate right after the handshake and drops the connection, without an alert.
    assert.ok(error === undefined || error === 'ECONNRESET', `${route.method} ${route.path} on the ${route.server}: ${error}`);
  }
});

test('every route answers 403 VMF_FORBIDDEN to a cluster certificate of the wrong role', async () => {
  const byRole: Record<'controller' | 'agent' | 'operator', TlsIdentity> = { controller: clients.controller, agent: clients.agentA, operator: clients.operator };
  let refused = 0;
  for (const route of await allRoutes()) {
    for (const role of ['controller', 'agent', 'operator'] as const) {
      if (allowed(route.server, route.method, route.pattern).includes(role)) continue;
      const body = bodyOf(route.method);
      await assert.rejects(
        requestJson(urls[route.server], route.method, route.path, { tls: byRole[role], ...(body ? { body: {} } : {}) }),
        (err) => hasCode(err, 'VMF_FORBIDDEN') && err.message.includes(`vmferry:${role}:`),
        `${role} on ${route.method} ${route.path} (${route.server})`,
      );
      refused++;
    }
  }
  // Agent routes refuse 2 roles each, controller and storage routes at least 1.
  assert.ok(refused >= 50, `${refused} refusals`);
});

test('the right role gets through: operator → controller → agent, controller and agent → storage', async () => {
  const hosts = await requestJson<{ id: string; url: string }[]>(urls.controller, 'GET', '/v1/hosts', { tls: clients.operator });
  assert.deepEqual(hosts.map((h) => [h.id, h.url]), [['A', urls.agent]]);
  // The controller asks agent A over mutual TLS with its own certificate.
  assert.deepEqual(await requestJson(urls.controller, 'GET', '/v1/hosts/A/quarantine', { tls: clients.operator }), []);
  const host = await requestJson<{ hostId: string }>(urls.agent, 'GET', '/v1/host', { tls: clients.controller });
  assert.equal(host.hostId, 'A');
  await requestJson(urls.storage, 'POST', '/v1/volumes', { body: { name: 'v1', sizeBytes: 1 << 20 }, tls: clients.controller });
  const volumes = await requestJson<{ name: string }[]>(urls.storage, 'GET', '/v1/volumes', { tls: clients.agentA });
  assert.deepEqual(volumes.map((v) => v.name), ['v1']);
});

test('GET /healthz: every role of the cluster that calls gets it from every server', async () => {
  const byRole = { controller: clients.controller, agent: clients.agentA, operator: clients.operator };
  const listed = await allRoutes();
  for (const server of ['agent', 'controller', 'storage'] as const) {
    // Listed, so the handshake tests above cover it too.
    assert.ok(listed.some((r) => r.server === server && r.method === 'GET' && r.pattern === '/healthz'), `the ${server} lists /healthz`);
    for (const [role, tls] of Object.entries(byRole)) {
      const health = await requestJson<{ status: string; role: string }>(urls[server], 'GET', '/healthz', { tls });
      assert.deepEqual([health.status, health.role], ['ok', server], `${role} on the ${server}`);
    }
  }
});

test('an agent cannot heartbeat as another host: the host keeps its URL', async () => {
  await assert.rejects(
    requestJson(urls.controller, 'POST', '/v1/hosts/heartbeat', { body: { id: 'B', url: 'https://127.0.0.1:1', address: '127.0.0.1' }, tls: clients.agentA }),
    (err) => hasCode(err, 'VMF_FORBIDDEN') && /vmferry:agent:A may not act for "B"/.test(err.message),
  );
  await assert.rejects(
    requestJson(urls.controller, 'POST', '/v1/hosts/heartbeat', { body: { id: 'A', url: 'https://127.0.0.1:1', address: '127.0.0.1' }, tls: clients.operator }),
    (err) => hasCode(err, 'VMF_FORBIDDEN'),
  );
  const hosts = await requestJson<{ id: string; url: string }[]>(urls.controller, 'GET', '/v1/hosts', { tls: clients.operator });
  assert.deepEqual(hosts.map((h) => [h.id, h.url]), [['A', urls.agent]]);
});

test('a client without certificates is told to give them', async () => {
  await assert.rejects(requestJson(urls.controller, 'GET', '/v1/hosts'), (err) => hasCode(err, 'VMF_UNREACHABLE') && /--pki-dir/.test(err.message));
});

test("a client checks who the server is: host A's URL answered by B's agent, the storage server posing as the controller", async () => {
  assert.equal((await new AgentClient(agentBUrl, clients.controller, 'B').host()).hostId, 'B');
  await assert.rejects(new AgentClient(agentBUrl, clients.controller, 'A').host(), (err) => hasCode(err, 'VMF_UNREACHABLE') && /is vmferry:agent:B, not vmferry:agent:A/.test(err.message));
  await assert.rejects(new ControllerClient(urls.storage, clients.operator).hosts(), (err) => hasCode(err, 'VMF_UNREACHABLE') && /is vmferry:storage:storage, not a controller/.test(err.message));
  // Through the controller: A re-points itself (its own right) at B's agent, and the controller refuses to drive B as A.
  await requestJson(urls.controller, 'POST', '/v1/hosts/heartbeat', { body: { id: 'A', url: agentBUrl, address: '127.0.0.1' }, tls: clients.agentA });
  try {
    await assert.rejects(requestJson(urls.controller, 'GET', '/v1/hosts/A/quarantine', { tls: clients.operator }), (err) => hasCode(err, 'VMF_UNREACHABLE') && /not vmferry:agent:A/.test(err.message));
  } finally {
    await requestJson(urls.controller, 'POST', '/v1/hosts/heartbeat', { body: { id: 'A', url: urls.agent, address: '127.0.0.1' }, tls: clients.agentA });
  }
});

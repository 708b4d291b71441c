// Bad requests to every endpoint of the agent and the controller (real HTTP,
// in-process servers): each gets a clear error naming the problem, and the
// server keeps serving.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { buildAgent } from '../../src/agent/server.ts';
import { buildController } from '../../src/controller/server.ts';
import { testGuestBoot, testGuestDir } from '../../src/guest/test-guest.ts';
import { defaultMigrationOptions } from '../../src/migration/plan.ts';
import { recordReliability } from '../support/reliability.ts';

let dir: string;
let agent: FastifyInstance;
let controller: FastifyInstance;
let agentUrl: string;
let controllerUrl: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-api-'));
  const logger = pino({ level: 'silent' });
  agent = (await buildAgent({ hostId: 'A', dataDir: join(dir, 'agent'), address: '127.0.0.1', logger, trustedDirs: [testGuestDir()] })).app;
  agentUrl = await agent.listen({ host: '127.0.0.1', port: 0 });
  controller = (await buildController({ dbPath: join(dir, 'controller.db'), logger })).app;
  controllerUrl = await controller.listen({ host: '127.0.0.1', port: 0 });
  await fetch(`${controllerUrl}/v1/hosts/heartbeat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id: 'A', url: agentUrl, address: '127.0.0.1' }) });
});

after(async () => {
  await agent.close();
  await controller.close();
  await rm(dir, { recursive: true, force: true });
});

interface BadRequest {
  server: 'agent' | 'controller';
  method: string;
  path: string;
  body?: unknown;
  raw?: string;
  contentType?: string;
  status: number;
  code: string;
  message: RegExp;
}

const validVm = { name: 'ok', ...testGuestBoot(), disks: [] };
const validPlan = {
  vm: 'ok',
  from: 'A',
  to: 'B',
  toAddress: '127.0.0.2',
  disks: [],
  ram: { memoryMiB: 64, maxDowntimeMs: 300, downtimeLimitsMs: [300], mode: 'live', allowPostcopy: false, compareMemory: false },
  options: defaultMigrationOptions,
  refusals: [],
};
const { downtimeLimitsMs: _dropped, ...ramWithoutLimits } = validPlan.ram;
const guestKernel = join(testGuestDir(), 'vmlinuz');
/** A migration's spec that tells the destination to open the host's first disk as it is. */
const rawDeviceSpec = { name: 'ok', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: guestKernel }, disks: [{ id: 'root', source: { kind: 'file', path: '/dev/sda', format: 'raw' } }] };

const cases: BadRequest[] = [
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, name: '../x' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /name/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, memoryMiB: 'lots' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /memoryMiB/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, disks: [{ id: 'Root Disk', local: { sizeBytes: 1 << 20 } }] }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /disks\/0\/id/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, disks: [{ id: 'root', local: { import: join(testGuestDir(), 'web.qcow2') } }] }, status: 400, code: 'VMF_IMAGE_INVALID', message: /cannot import \/\S+\/web\.qcow2: no such file/ },
  // What only the agent's operator may allow (src/agent/request-guard.ts):
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, disks: [{ id: 'root', local: { import: '/etc/shadow' } }] }, status: 403, code: 'VMF_FORBIDDEN', message: /disks\.root\.local\.import \/etc\/shadow is outside the agent's trusted directories .*--trusted-dir/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, boot: { kind: 'kernel', kernel: '/etc/shadow' } }, status: 403, code: 'VMF_FORBIDDEN', message: /boot\.kernel \/etc\/shadow is outside/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, boot: { kind: 'kernel', kernel: guestKernel, initrd: `${testGuestDir()}/${'../'.repeat(16)}etc/shadow` } }, status: 403, code: 'VMF_FORBIDDEN', message: /boot\.initrd \S+ \(which resolves to \/etc\/shadow\) is outside/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, disks: [{ id: 'd', shared: { server: { type: 'inet', host: '192.0.2.1', port: 10809 }, export: 'e' } }] }, status: 403, code: 'VMF_FORBIDDEN', message: /disks\.d\.shared\.server is on the NBD server 192\.0\.2\.1:10809, and this agent has no storage server/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/prepare', body: { spec: rawDeviceSpec, plan: validPlan }, status: 403, code: 'VMF_FORBIDDEN', message: /disk root is the file \/dev\/sda and its plan does not mirror it/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/prepare', body: { spec: { ...rawDeviceSpec, disks: [], boot: { kind: 'kernel', kernel: '/boot/../etc/passwd' } }, plan: validPlan }, status: 403, code: 'VMF_FORBIDDEN', message: /boot\.kernel/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/begin', body: { plan: { ...validPlan, from: 'B' } }, status: 403, code: 'VMF_FORBIDDEN', message: /planned from B, not from A/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, disks: [{ id: 'root', local: { import: 'web.qcow2' } }] }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /disks\/0\/local\/import/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, disks: [{ id: 'd', shared: { server: { type: 'inet', host: 'x', port: 99999 }, export: 'e' } }] }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /port|server/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, disks: [{ id: 'd' }] }, status: 400, code: 'VMF_INVALID_SPEC', message: /needs "local", "shared" or "rbd"/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, extra: 1 }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /additional properties|extra/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', raw: '{"name": ', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /JSON/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', raw: JSON.stringify({ ...validVm, pad: 'x'.repeat(2 * 1024 * 1024) }), status: 413, code: 'VMF_INVALID_ARGUMENT', message: /too large/ },
  { server: 'agent', method: 'GET', path: '/v1/vms/nope', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope on A/ },
  { server: 'agent', method: 'GET', path: '/v1/vms/..%2Fetc', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /name/ },
  { server: 'agent', method: 'POST', path: '/v1/vms/nope/start', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'agent', method: 'POST', path: '/v1/vms/nope/stop?force=maybe', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /force/ },
  { server: 'agent', method: 'DELETE', path: '/v1/vms/nope', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'agent', method: 'POST', path: '/v1/vms/nope/probe-source', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'agent', method: 'POST', path: '/v1/probe-destination', body: { spec: { name: 'x' } }, status: 400, code: 'VMF_INVALID_SPEC', message: /vcpus/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/prepare', body: { spec: { vcpus: 1 }, plan: validPlan }, status: 400, code: 'VMF_INVALID_SPEC', message: /name/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/resume', status: 404, code: 'VMF_NOT_FOUND', message: /migration m1 has no destination/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/wait-incoming', status: 404, code: 'VMF_NOT_FOUND', message: /no destination/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/begin', body: { plan: { ...validPlan, vm: 'nope' } }, status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  // Every field the planner sets is checked, not only those an agent once read (a plan without downtimeLimitsMs was taken).
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/begin', body: { plan: { ...validPlan, vm: 'nope', ram: ramWithoutLimits } }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /plan\/ram must have required property 'downtimeLimitsMs'/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/begin', body: { plan: { ...validPlan, vm: 'nope', options: { ...defaultMigrationOptions, copyMode: 'eventually' } } }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /plan\/options\/copyMode/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/mirrors', body: { targets: [], copyMode: 'fast' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /copyMode/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/migrate', body: { uri: 'exec:rm -rf /', settings: { downtimeLimitMs: 1, allowPostcopy: false, tls: false } }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /uri/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/postcopy-resume', body: { uri: 'exec:rm -rf /' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /uri/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/postcopy-recover', status: 404, code: 'VMF_NOT_FOUND', message: /migration m1 has no destination/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/postcopy-resets', status: 404, code: 'VMF_NOT_FOUND', message: /migration m1 has no post-copy resumed on / },
  { server: 'agent', method: 'GET', path: '/v1/migrations/m1/source/info', status: 404, code: 'VMF_NOT_FOUND', message: /migration m1 has no source/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/wait-milestone?waitMs=1e400', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /waitMs must be an integer from 1 to 10000/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/wait-milestone?waitMs=0', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /waitMs/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/downtime-limit', body: { ms: -5 }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /ms/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/bad%20id/source/retire', body: { keepLocalDisks: false }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /params\/id must match pattern/ },
  { server: 'agent', method: 'GET', path: '/v1/nothing-here', status: 404, code: 'VMF_NOT_FOUND', message: /no route GET \/v1\/nothing-here/ },
  { server: 'controller', method: 'POST', path: '/v1/hosts/heartbeat', body: { id: 'B', url: 'ftp://x', address: 'b' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /url/ },
  { server: 'controller', method: 'POST', path: '/v1/hosts/heartbeat', body: { id: 'B', url: 'http://x', address: 'b', accelerator: 'hvf' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /accelerator/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, cpu: 'qemu64,+avx2' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /cpu must match pattern/ },
  { server: 'controller', method: 'POST', path: '/v1/vms', body: { host: 'A' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /vm/ },
  { server: 'controller', method: 'POST', path: '/v1/vms', body: { host: 'Z', vm: validVm }, status: 404, code: 'VMF_NOT_FOUND', message: /no host named Z/ },
  { server: 'controller', method: 'GET', path: '/v1/vms/nope', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'controller', method: 'POST', path: '/v1/vms/nope/start', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'controller', method: 'POST', path: '/v1/vms/nope/stop', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'controller', method: 'DELETE', path: '/v1/vms/nope', status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', body: { vm: 'web' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /to/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', body: { vm: 'web', to: 'A', maxDowntimeMs: 0 }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /maxDowntimeMs/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', body: { vm: 'web', to: 'A', ramMode: 'fast' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /ramMode/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', body: { vm: 'web', to: 'A', timeoutAction: 'suspend' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /timeoutAction/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', body: { vm: 'web', to: 'A', deadlineS: 0 }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /deadlineS/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', body: { vm: 'web', to: 'A', copyMode: 'turbo' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /copyMode/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', body: { vm: 'nope', to: 'A' }, status: 404, code: 'VMF_NOT_FOUND', message: /no VM named nope/ },
  { server: 'controller', method: 'GET', path: '/v1/migrations/nope', status: 404, code: 'VMF_NOT_FOUND', message: /no migration nope/ },
  { server: 'controller', method: 'GET', path: '/v1/migrations/nope/events?after=-1', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /after/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations/nope/cancel', status: 404, code: 'VMF_NOT_FOUND', message: /no migration nope/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations/nope/resolve', body: { runOn: 'A' }, status: 404, code: 'VMF_NOT_FOUND', message: /no migration nope/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations/nope/resolve', body: {}, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /runOn/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/take-back', status: 404, code: 'VMF_NOT_FOUND', message: /A holds nothing of migration m1/ },
  // Found by test/fuzz/api-fuzz.test.ts:
  { server: 'controller', method: 'POST', path: '/v1/hosts/heartbeat', body: { id: 123, url: 'http://x', address: 'b' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /body\/id must be string/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/retire', body: { keepLocalDisks: 'yes' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /keepLocalDisks must be boolean/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/retire', body: { keepLocalDisks: false, keepLocalDisk: true }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /additional properties/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/prepare', body: { spec: {}, plan: 'garbage' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /plan must be object/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/source/downtime-limit', body: { ms: 2 ** 64 }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /ms must be <=/ },
  { server: 'agent', method: 'GET', path: `/v1/vms/${'a'.repeat(5000)}`, status: 414, code: 'VMF_INVALID_ARGUMENT', message: /longer than 100 characters/ },
  { server: 'agent', method: 'GET', path: '/v1/vms/%C0%AE', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /not a valid url component/ },
  { server: 'controller', method: 'POST', path: '/v1/migrations', raw: '<vm/>', contentType: 'application/xml', status: 415, code: 'VMF_INVALID_ARGUMENT', message: /unsupported content-type "application\/xml"/ },
  { server: 'controller', method: 'GET', path: '/v1/migrations/nope/events?after=1e400', status: 400, code: 'VMF_INVALID_ARGUMENT', message: /after must be an integer/ },
  // Every string of a body is bounded, and an address goes into QEMU URIs as it is:
  { server: 'controller', method: 'POST', path: '/v1/hosts/heartbeat', body: { id: 'B', url: 'http://x', address: '10.0.0.2,x-fd=3' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /address must match pattern/ },
  { server: 'controller', method: 'POST', path: '/v1/hosts/heartbeat', body: { id: 'B', url: `http://${'x'.repeat(3000)}`, address: 'b' }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /url must NOT have more than 2048 characters/ },
  { server: 'agent', method: 'POST', path: '/v1/vms', body: { ...validVm, boot: { kind: 'kernel', kernel: `/${'k'.repeat(5000)}` } }, status: 400, code: 'VMF_INVALID_ARGUMENT', message: /kernel must NOT have more than 4096 characters/ },
  { server: 'agent', method: 'POST', path: '/v1/migrations/m1/destination/prepare', body: { spec: { ...rawDeviceSpec, boot: { kind: 'kernel', kernel: `/${'k'.repeat(5000)}` } }, plan: validPlan }, status: 400, code: 'VMF_INVALID_SPEC', message: /boot\.kernel must be at most 4096 bytes/ },
];

for (const c of cases) {
  test(`${c.server} ${c.method} ${c.path} with ${c.raw !== undefined ? 'a raw body' : JSON.stringify(c.body ?? null).slice(0, 60)} → ${c.status} ${c.code}`, async () => {
    const base = c.server === 'agent' ? agentUrl : controllerUrl;
    const hasBody = c.raw !== undefined || c.body !== undefined || c.method === 'POST';
    const response = await fetch(`${base}${c.path}`, {
      method: c.method,
      headers: hasBody ? { 'content-type': c.contentType ?? 'application/json' } : {},
      body: c.raw ?? (hasBody ? JSON.stringify(c.body ?? {}) : null),
    });
    const body = (await response.json()) as { code: string; message: string };
    const held = response.status === c.status && body.code === c.code && c.message.test(body.message);
    recordReliability(import.meta.url, {
      kind: 'bad-input',
      target: c.server === 'agent' ? 'agent API' : 'controller API',
      tried: `${c.method} ${c.path.slice(0, 80)} with ${c.raw !== undefined ? `raw body ${JSON.stringify(c.raw.slice(0, 40))}${c.raw.length > 40 ? ` (${c.raw.length} bytes)` : ''}` : JSON.stringify(c.body ?? null).slice(0, 100)}`,
      observed: `${response.status} ${body.code}: ${body.message.slice(0, 160)}`,
      ok: held,
    });
    assert.equal(response.status, c.status, body.message);
    assert.equal(body.code, c.code, body.message);
    assert.match(body.message, c.message);
  });
}

test('both servers still answer after all of that', async () => {
  assert.equal((await fetch(`${agentUrl}/v1/vms`)).status, 200);
  assert.equal((await fetch(`${controllerUrl}/v1/hosts`)).status, 200);
  const openapi = (await (await fetch(`${agentUrl}/openapi.json`)).json()) as { paths: Record<string, unknown> };
  assert.ok('/v1/vms' in openapi.paths, 'the agent serves its OpenAPI document');
});

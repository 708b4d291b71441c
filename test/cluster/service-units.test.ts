// The units' own command lines (contrib/systemd, ExecStart with the example
// environment files' variables) start a storage server, a controller and an
// agent as processes under mutual TLS; each answers /healthz and /metrics to a
// monitor's operator certificate, the controller's /metrics sees the agent, and each
// stops cleanly on SIGTERM, as `systemctl stop` sends it. Paths under /etc,
// /var/lib and /srv are moved into a temporary directory; the agent runs with
// --accel tcg, so it starts no QEMU (its health asks the binary's --version).
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { request } from 'node:https';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { identityDir, initCa, issueCertificate } from '../../src/security/pki.ts';
import { loadTlsIdentity, type TlsIdentity } from '../../src/security/tls-files.ts';
import { contribSystemd, environmentFile, execStartWords, installedCli } from '../support/systemd-unit.ts';

const cli = join(import.meta.dirname, '../../bin/vmferry.js');
const children: ChildProcess[] = [];
let dir: string | undefined;

after(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  if (dir) await rm(dir, { recursive: true, force: true });
});

interface Daemon {
  child: ChildProcess;
  /** The daemon's own log line saying it is ready (fastify's "Server listening at" comes first). */
  ready: Record<string, unknown>;
  exited: Promise<number | null>;
}

/** Runs a unit's ExecStart with `env` (the example file's variables, overridden), its paths moved under `dir`. */
async function startUnit(unit: string, envFile: string, overrides: Record<string, string>, base: string, readyMessage: string): Promise<Daemon> {
  const text = (await readFile(join(contribSystemd, unit), 'utf8')).replaceAll('/etc/vmferry', join(base, 'etc')).replaceAll('/var/lib/vmferry', join(base, 'var-lib')).replaceAll('/srv/vmferry', join(base, 'srv'));
  const words = execStartWords(text, { ...environmentFile(await readFile(join(contribSystemd, envFile), 'utf8')), ...overrides });
  assert.equal(words[0], installedCli);
  const child = spawn(process.execPath, [cli, ...words.slice(1)], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, VMFERRY_LOG: 'info' } });
  children.push(child);
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const log: string[] = [];
  const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${unit} did not say "${readyMessage}" within 60 s:\n${log.join('\n')}`)), 60_000);
    void exited.then((code) => reject(new Error(`${unit} exited (${code}) before listening:\n${log.join('\n')}`)));
    createInterface({ input: child.stderr as NodeJS.ReadableStream }).on('line', (line) => {
      log.push(line);
      // A daemon that fails to start says why in one plain line ("vmferry: …"), not in JSON.
      const entry = line.startsWith('{') ? (JSON.parse(line) as Record<string, unknown>) : {};
      if (entry.msg === readyMessage) {
        clearTimeout(timer);
        resolve(entry);
      }
    });
  });
  return { child, ready, exited };
}

function get(url: string, path: string, tls: TlsIdentity): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    request(new URL(path, url), { ...tls }, (response) => {
      let body = '';
      response.on('data', (chunk: Buffer) => (body += chunk.toString()));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
    })
      .on('error', reject)
      .end();
  });
}

test('the units start the three daemons under mutual TLS; each answers /healthz and /metrics (the controller\'s counts the agent), and SIGTERM stops each with exit 0', async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-units-'));
  const pki = join(dir, 'etc/pki');
  await initCa(pki);
  for (const [role, id] of [['storage', 'storage'], ['controller', 'controller'], ['agent', 'A'], ['operator', 'prom']] as const) await issueCertificate(pki, { role, id });
  const monitor = loadTlsIdentity({ pkiDir: identityDir(pki, 'operator', 'prom') }, 'client') as TlsIdentity;

  const storage = await startUnit('vmferry-storage.service', 'storage.env.example', { VMFERRY_NBD_LISTEN: '127.0.0.1:0', VMFERRY_ADMIN_LISTEN: '127.0.0.1:0' }, dir, 'storage server ready');
  const storageUrl = storage.ready.adminUrl as string;
  // What the controller's StateDirectory=vmferry does before it starts.
  await mkdir(join(dir, 'var-lib'));
  const controller = await startUnit('vmferry-controller.service', 'controller.env.example', { VMFERRY_LISTEN: '127.0.0.1:0', VMFERRY_DB: join(dir, 'var-lib/controller.db'), VMFERRY_STORAGE: storageUrl }, dir, 'controller listening');
  const controllerUrl = controller.ready.url as string;
  const agent = await startUnit('vmferry-agent.service', 'agent.env.example', { VMFERRY_CONTROLLER: controllerUrl, VMFERRY_LISTEN: '127.0.0.1:0', VMFERRY_STORAGE: storageUrl, VMFERRY_AGENT_ARGS: '--accel tcg' }, dir, 'agent A listening');
  const agentUrl = agent.ready.url as string;

  // The agent heartbeats at start: the controller's health counts it once the first one arrived.
  let controllerHealth: Record<string, unknown> = {};
  for (let i = 0; i < 100 && controllerHealth.hostsReachable !== 1; i++) {
    if (i > 0) await sleep(100);
    const answer = await get(controllerUrl, '/healthz', monitor);
    assert.equal(answer.status, 200, answer.body);
    controllerHealth = JSON.parse(answer.body) as Record<string, unknown>;
  }
  assert.deepEqual([controllerHealth.status, controllerHealth.role, controllerHealth.hosts, controllerHealth.hostsReachable], ['ok', 'controller', 1, 1]);
  for (const [url, role] of [[agentUrl, 'agent'], [storageUrl, 'storage']] as const) {
    const answer = await get(url, '/healthz', monitor);
    assert.equal(answer.status, 200, answer.body);
    assert.deepEqual([(JSON.parse(answer.body) as { status: string }).status, (JSON.parse(answer.body) as { role: string }).role], ['ok', role]);
  }
  const metrics = await get(controllerUrl, '/metrics', monitor);
  assert.equal(metrics.status, 200);
  assert.match(metrics.body, /^vmferry_hosts\{state="reachable"\} 1$/m);
  assert.match(metrics.body, /^vmferry_migrations_total\{outcome="completed"\} 0$/m);
  const agentMetrics = await get(agentUrl, '/metrics', monitor);
  assert.equal(agentMetrics.status, 200, agentMetrics.body);
  assert.match(agentMetrics.body, /^vmferry_agent_build_info\{version="[^"]+",host="A",accelerator="tcg"\} 1$/m);
  assert.match(agentMetrics.body, /^vmferry_agent_vms\{state="running"\} 0$/m);
  const storageMetrics = await get(storageUrl, '/metrics', monitor);
  assert.equal(storageMetrics.status, 200, storageMetrics.body);
  assert.match(storageMetrics.body, /^vmferry_storage_volumes 0$/m);

  for (const [name, daemon] of [['agent', agent], ['controller', controller], ['storage', storage]] as const) {
    daemon.child.kill('SIGTERM');
    assert.equal(await daemon.exited, 0, `${name} exits 0 on SIGTERM`);
  }
});

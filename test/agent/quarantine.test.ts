// An agent that restarts with a VM directory it cannot read (no spec.json, an
// empty one, garbage) deletes nothing: it starts, loads every other VM, and
// moves what it cannot account for to the quarantine, where a person lists,
// restores or purges it with `vmferry host quarantine` (issue 13, problem 2).
// A real agent and controller in this process, the real CLI as a user runs it,
// images written and read back with qemu-io.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pino from 'pino';
import { AgentClient } from '../../src/agent/client.ts';
import { startHeartbeat } from '../../src/agent/heartbeat.ts';
import { buildAgent } from '../../src/agent/server.ts';
import type { QuarantineEntry } from '../../src/api/agent-types.ts';
import { buildController } from '../../src/controller/server.ts';
import { hasCode } from '../../src/errors.ts';
import { testGuestBoot, testGuestDir } from '../../src/guest/test-guest.ts';
import { requestJson } from '../../src/http/errors.ts';
import { makeTempDir } from '../support/temp.ts';
import { runVmferry, type CliResult } from '../support/cli.ts';

const execFile = promisify(execFileCallback);
const logger = pino({ level: 'silent' });

let dir: Awaited<ReturnType<typeof makeTempDir>>;
let dataDir: string;
let controller: FastifyInstance;
let controllerUrl: string;
let agent: FastifyInstance | undefined;
let stopHeartbeat: (() => void) | undefined;
let client: AgentClient;

/** (Re)starts the agent on the same data directory, reporting to the controller as `vmferry agent` does. */
async function startAgent(): Promise<void> {
  stopHeartbeat?.();
  await agent?.close();
  agent = (await buildAgent({ hostId: 'A', dataDir, address: '127.0.0.1', logger, trustedDirs: [testGuestDir()] })).app;
  client = new AgentClient(await agent.listen({ host: '127.0.0.1', port: 0 }));
  const host = { id: 'A', url: client.url, address: '127.0.0.1' };
  await requestJson(controllerUrl, 'POST', '/v1/hosts/heartbeat', { body: host });
  stopHeartbeat = startHeartbeat([controllerUrl], host, logger);
}

function vmferry(...args: string[]): Promise<CliResult> {
  return runVmferry(controllerUrl, args);
}

async function createVm(name: string): Promise<string> {
  const vm = await client.createVm({ name, memoryMiB: 128, ...testGuestBoot(), disks: [{ id: 'root', local: { sizeBytes: 16 << 20 } }] });
  const disk = vm.spec.disks[0]?.source;
  assert.ok(disk?.kind === 'file');
  return disk.path;
}

async function sha256(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

/** Every file under the agent's data directory with exactly these bytes. */
async function copiesOf(hash: string): Promise<string[]> {
  const found: string[] = [];
  for (const path of await readdir(dataDir, { recursive: true })) {
    const full = join(dataDir, path);
    if ((await stat(full)).isFile() && (await sha256(full)) === hash) found.push(full);
  }
  return found;
}

before(async () => {
  dir = await makeTempDir('quarantine');
  dataDir = join(dir.path, 'agent');
  controller = (await buildController({ dbPath: join(dir.path, 'controller.db'), logger })).app;
  controllerUrl = await controller.listen({ host: '127.0.0.1', port: 0 });
  await startAgent();
});

after(async () => {
  stopHeartbeat?.();
  await agent?.close();
  await controller.close();
  await dir.remove();
});

test('an image whose VM lost its spec.json is kept in quarantine, intact, and restore puts it back', async () => {
  const image = await createVm('web');
  // A VM whose name starts like the lost one: its image is in use and stays where it is.
  const neighbour = await createVm('web-2');
  await execFile('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 4M', image]);
  const written = await sha256(image);
  const neighbourBytes = await sha256(neighbour);
  await rm(join(dataDir, 'vms', 'web', 'spec.json'));

  await startAgent();
  assert.equal((await copiesOf(written)).length, 1, 'the written image still exists on the host');
  assert.deepEqual((await client.listVms()).map((vm) => vm.name), ['web-2'], 'the agent started and loaded the VM it can read');
  assert.equal(await sha256(neighbour), neighbourBytes, 'web-2 keeps its image');
  await assert.rejects(readFile(image), 'the image left the pool');

  const listed = await vmferry('--json', 'host', 'quarantine', 'list', 'A');
  assert.equal(listed.code, 0, listed.stderr);
  const [entry, ...others] = JSON.parse(listed.stdout) as QuarantineEntry[];
  assert.ok(entry);
  assert.equal(others.length, 0);
  assert.equal(entry.vm, 'web');
  assert.match(entry.reason, /no spec\.json/);
  assert.deepEqual(entry.items.map((item) => [item.kind, item.from]).sort(), [
    ['pool-image', image],
    ['vm-dir', join(dataDir, 'vms', 'web')],
  ]);
  assert.ok(entry.items.every((item) => (item.kind === 'pool-image' ? (item.sizeBytes ?? 0) > 0 : item.sizeBytes !== null)), 'sizes are shown');
  assert.equal(await sha256(join(dataDir, 'quarantine', entry.id, 'pool', 'web-root.qcow2')), written, 'the quarantined image holds every byte that was written');
  const human = await vmferry('host', 'quarantine', 'list', 'A');
  for (const shown of [entry.id, image, '4.3 MiB', 'no spec.json']) assert.ok(human.stdout.includes(shown), `the table shows ${shown}:\n${human.stdout}`);

  const restored = await vmferry('host', 'quarantine', 'restore', 'A', entry.id);
  assert.equal(restored.code, 0, restored.stderr);
  assert.equal(await sha256(image), written, 'the image is back in the pool, unchanged');
  await execFile('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0xab 0 4M', image]);
  assert.deepEqual(await client.quarantine(), []);
  // Its directory came back without a spec, so the agent does not list it; the next tests start without it.
  await rm(join(dataDir, 'vms', 'web'), { recursive: true });
  await rm(image);
});

test('a restore never overwrites: something at the original place is a 409', async () => {
  const image = await createVm('db');
  await writeFile(join(dataDir, 'vms', 'db', 'spec.json'), '');
  await startAgent();
  const [entry] = await client.quarantine();
  assert.ok(entry);
  // Meanwhile a new VM took the name and its image path.
  await createVm('db');
  const newImage = await sha256(image);
  await assert.rejects(client.restoreQuarantined(entry.id), (err) => hasCode(err, 'VMF_CONFLICT') && err.message.includes(image));
  assert.equal(await sha256(image), newImage, 'the new image is untouched');
  assert.equal((await client.quarantine()).length, 1, 'the entry is still there');

  const purged = await vmferry('host', 'quarantine', 'purge', 'A', entry.id);
  assert.equal(purged.code, 0, purged.stderr);
  assert.deepEqual(await client.quarantine(), []);
  const again = await vmferry('host', 'quarantine', 'purge', 'A', entry.id);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /no quarantine entry .*\[VMF_NOT_FOUND\]/);
  await client.deleteVm('db');
});

test('an empty and a garbage spec.json do not stop the agent: the other VMs load, the bad ones are quarantined', async () => {
  const empty = await createVm('empty');
  const garbage = await createVm('garbage');
  await createVm('fine');
  await writeFile(join(dataDir, 'vms', 'empty', 'spec.json'), '');
  await writeFile(join(dataDir, 'vms', 'garbage', 'spec.json'), '{"name": "garbage", "vcpus": "lots"\u0000\u0000');

  await startAgent();
  assert.deepEqual((await client.listVms()).map((vm) => vm.name), ['fine', 'web-2']);
  const entries = await client.quarantine();
  const byVm = new Map(entries.map((e) => [e.vm, e]));
  assert.match(byVm.get('empty')?.reason ?? '', /spec\.json is empty/);
  assert.match(byVm.get('garbage')?.reason ?? '', /spec\.json is invalid/);
  assert.deepEqual(byVm.get('empty')?.items.find((item) => item.kind === 'pool-image')?.from, empty);
  assert.deepEqual(byVm.get('garbage')?.items.find((item) => item.kind === 'pool-image')?.from, garbage);

  // A spec repaired inside the quarantine comes back as a VM at once.
  const entry = byVm.get('garbage') as QuarantineEntry;
  const spec = { name: 'garbage', vcpus: 1, memoryMiB: 128, boot: { kind: 'kernel', kernel: '/boot/vmlinuz' }, disks: [{ id: 'root', source: { kind: 'file', path: garbage, format: 'qcow2' } }] };
  await writeFile(join(dataDir, 'quarantine', entry.id, 'vm', 'garbage', 'spec.json'), JSON.stringify(spec));
  await client.restoreQuarantined(entry.id);
  assert.equal((await client.getVm('garbage')).state, 'stopped');
});

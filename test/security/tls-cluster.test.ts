// A whole cluster with mutual TLS on every HTTP API (LocalCluster's tls
// option: controller, storage server and agent processes started with
// --pki-dir): agents register over TLS, a VM with a local and a shared disk
// is created, started and live-migrated (RAM and mirror over TLS between the agents' QEMUs), keeps
// writing on its new host, its shared disk is reached under TLS (the storage server refuses plain NBD),
// and every write the guest had acknowledged is intact afterwards.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { hasCode } from '../../src/errors.ts';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import { followMigration } from '../../src/cli/progress.ts';
import { checkVerify, readGuestReport, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import { requestJson } from '../../src/http/errors.ts';
import { makeTempDir } from '../support/temp.ts';

const execFile = promisify(execFileCallback);
let cluster: LocalCluster;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  work = await makeTempDir('tls-cluster');
  cluster = await LocalCluster.start({
    workDir: join(work.path, 'cluster'),
    hostIds: ['A', 'B'],
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    // No KVM probe at each agent start (3 s where KVM hangs): test/qemu/accel.test.ts covers --accel auto.
    accel: 'tcg',
    network: { prefix: 'vmft', subnet: '10.213.91', hostLinkSubnet: '10.213.92' },
    storageProcess: true,
    tls: true,
  });
});
after(async () => {
  await cluster?.stop();
  await work?.remove();
});

test('with TLS on every API and between QEMUs: hosts register, a VM is created, started and migrated, and keeps every acked record', async () => {
  for (const url of [cluster.controllerUrl, cluster.storageAdminUrl, ...cluster.hosts.map((h) => h.agentUrl)]) assert.match(url, /^https:/);
  // The agents heartbeat with their own certificates: the controller lists both.
  assert.deepEqual((await cluster.api.hosts()).map((h) => [h.id, h.state]).sort(), [['A', 'reachable'], ['B', 'reachable']]);
  // Nothing answers a client without the cluster's certificates.
  await assert.rejects(requestJson(cluster.controllerUrl, 'GET', '/v1/vms'), (err) => hasCode(err, 'VMF_UNREACHABLE'));
  await assert.rejects(requestJson(cluster.storageAdminUrl, 'GET', '/v1/volumes'), (err) => hasCode(err, 'VMF_UNREACHABLE'));

  await cluster.createVolume('tls-data', 32 << 20);
  await cluster.api.createVm('A', {
    name: 'tls-vm',
    memoryMiB: 128,
    boot: { kind: 'test-guest', options: { intervalMs: 100 } },
    disks: [
      { id: 'root', local: { sizeBytes: 64 << 20 } },
      // A writable shared disk: starting and migrating it moves its writer lease, an agent → storage call over TLS.
      { id: 'data', shared: { server: { type: 'inet', ...cluster.storageNbd }, export: 'tls-data' } },
    ],
  });
  await cluster.api.startVm('tls-vm');
  const logs = ['A', 'B'].map((id) => join(cluster.host(id).dataDir, 'vms', 'tls-vm', 'serial1.log'));
  const disks = ['root', 'data'];
  const before = (await waitForAcks(logs, disks, { atLeast: 10, timeoutMs: 120_000 })).acks;
  // The storage server knows its NBD clients by their certificates, and has no other kind.
  const connections = await requestJson<{ peer?: string }[]>(cluster.storageAdminUrl, 'GET', '/v1/connections', { tls: cluster.pki?.controller, server: { role: 'storage' } });
  assert.ok(connections.length > 0 && connections.every((c) => c.peer === 'vmferry:agent:A'), JSON.stringify(connections));
  const plain = await execFile('qemu-img', ['info', `nbd://${cluster.storageNbd.host}:${cluster.storageNbd.port}/tls-data`]).then(() => 'served', (err: { stderr: string }) => err.stderr);
  assert.match(plain, /TLS negotiation required/);

  const started = await cluster.api.migrate({ vm: 'tls-vm', to: 'B' });
  const report = await followMigration(cluster.api, started.id as string, 'silent');
  assert.equal(report.outcome, 'completed', report.error?.message);
  const vm = await cluster.api.vm('tls-vm');
  assert.deepEqual([vm.host, vm.state], ['B', 'running']);
  await waitForAcks(logs, disks, { atLeast: 10, since: before, timeoutMs: 120_000 });

  await cluster.api.stopVm('tls-vm', true);
  const acked = (await readGuestReport(logs)).acks;
  const verify = await verifyDisks(vm.spec.disks, join(work.path, 'verify'), { tlsDir: join(cluster.host('B').dataDir, 'tls') });
  assert.deepEqual(checkVerify(verify, acked), [], 'every acknowledged record is intact');
});

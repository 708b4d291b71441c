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
import { chromium } from 'playwright-core';
import { startDashboardProxy } from '../../src/cli/dashboard-proxy.ts';
import type { ProgressLine } from '../../src/cli/progress.ts';
import type { MigrationReport } from '../../src/migration/phases.ts';
import { checkVerify, readGuestReport, testGuestBoot, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import { requestJson } from '../../src/http/errors.ts';
import { makeTempDir } from '../support/temp.ts';

const execFile = promisify(execFileCallback);
const cli = join(import.meta.dirname, '../../bin/vmferry.js');
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

/**
 * Starts a migration of `vm` to `to` from the dashboard's page and follows it there until its report, every bar at 100 %,
 * while `vmferry --json migration watch` re-attaches to it from the command line. Returns the migration's id and what
 * the CLI printed. With VMFERRY_SCREENSHOT=1 the page, as it ends, becomes the README's picture.
 */
async function migrateFromDashboard(vm: string, to: string): Promise<{ id: string; watched: string }> {
  const proxy = await startDashboardProxy({ controllerUrl: cluster.controllerUrl, tls: cluster.pki?.operator, listen: { host: '127.0.0.1', port: 0 } });
  // Debian's chromium, never a downloaded browser; as root it runs only without its sandbox.
  const browser = await chromium.launch({ executablePath: '/usr/lib/chromium/chromium', args: ['--no-sandbox'] });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
    const pageErrors: string[] = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));
    // A browser without the token is refused; the printed URL lets it in.
    const refused = await page.goto(proxy.url.replace(/\?token=.*/, ''));
    assert.equal(refused?.status(), 403);
    await page.goto(proxy.url);
    await page.getByTestId('live-state').getByText('live', { exact: true }).waitFor();
    const row = page.locator(`tr[data-vm="${vm}"]`);
    await row.getByRole('combobox').selectOption(to);
    await row.getByRole('button', { name: 'Plan' }).click();
    const plan = await page.getByTestId('plan').innerText();
    assert.match(plan, /root\s+local\s+mirror/);
    assert.match(plan, /data\s+shared\s+reattach/);
    // Every phase the page shows, as it shows it: a live view passes through several before the report.
    // (Page code as text: the tests compile without the DOM's types.)
    await page.evaluate(`{
      const seen = (window.phasesSeen = []);
      new MutationObserver(() => {
        const phase = document.querySelector('[data-testid=phase]')?.textContent ?? '';
        if (phase && seen.at(-1) !== phase) seen.push(phase);
      }).observe(document.body, { subtree: true, childList: true, characterData: true });
    }`);
    await row.getByRole('button', { name: 'Migrate' }).click();
    const live = page.getByTestId('live');
    await live.waitFor();
    const id = (await live.getAttribute('data-migration')) as string;
    const pkiDir = join(work.path, 'cluster', 'pki', 'operator');
    const watching = execFile(process.execPath, [cli, '--controller', cluster.controllerUrl, '--pki-dir', pkiDir, '--json', 'migration', 'watch', id], { timeout: 180_000 });
    await page.getByTestId('report').waitFor({ timeout: 180_000 });
    assert.equal(await page.getByTestId('report').getAttribute('data-outcome'), 'completed', await page.getByTestId('report').innerText());
    const bars = page.locator('[data-testid=disk-bar], [data-testid=ram-bar]');
    const percents = await Promise.all((await bars.all()).map(async (bar) => `${await bar.innerText()}: ${await bar.getAttribute('data-percent')}`));
    assert.equal(percents.length, 2, 'a bar for the local disk root and one for RAM');
    assert.ok(percents.every((p) => p.endsWith(': 100')), percents.join(', '));
    const phasesSeen = await page.evaluate<string[]>('window.phasesSeen');
    assert.ok(phasesSeen.length >= 3 && phasesSeen.at(-1) === 'completed', `the page showed ${phasesSeen.join(' → ')}`);
    await page.getByTestId('timeline').getByText('completed').waitFor();
    // The VM list followed the migration's end without a reload.
    await page.locator(`tr[data-vm="${vm}"] td:nth-child(2)`).getByText(to, { exact: true }).waitFor();
    if (process.env.VMFERRY_SCREENSHOT === '1') await page.screenshot({ path: join(import.meta.dirname, '../../docs/img/dashboard.png'), fullPage: true });
    assert.deepEqual(pageErrors, []);
    return { id, watched: (await watching).stdout };
  } finally {
    await browser.close();
    await proxy.close();
  }
}

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
    ...testGuestBoot({ intervalMs: 100 }),
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

  // The migration is started from the dashboard in Chromium, through `vmferry dashboard`'s proxy (it holds the operator's
  // certificate), while `vmferry migration watch --json` follows it from the command line.
  const dashboardStart = Date.now();
  const { id, watched } = await migrateFromDashboard('tls-vm', 'B');
  const report = (await cluster.api.migration(id)).report;
  console.log(`# the dashboard's part took ${Date.now() - dashboardStart} ms, of which the migration ${report?.totalMs} ms`);
  assert.equal(report?.outcome, 'completed', report?.error?.message);
  const lines = watched.trim().split('\n').map((line) => JSON.parse(line) as ProgressLine | { id: string; report: MigrationReport });
  // The last line is the report, as `migrate --json` always ended; before it one line per event, in order.
  assert.deepEqual(lines.at(-1), { id, report });
  const events = lines.slice(0, -1) as ProgressLine[];
  assert.ok(events.length > 0 && events.every((line, i) => line.id === id && line.seq === i + 1), events.map((l) => `${l.id} #${l.seq}`).join(' '));
  const phases = events.flatMap((line) => (line.event.type === 'phase' ? [line.event.phase] : []));
  assert.deepEqual([phases[0], phases.at(-1)], ['preparing', 'completed'], phases.join(' → '));
  assert.ok(events.some((line) => line.event.type === 'ram') && events.some((line) => line.event.type === 'disks'), 'RAM and disk progress were streamed');
  const vm = await cluster.api.vm('tls-vm');
  assert.deepEqual([vm.host, vm.state], ['B', 'running']);
  await waitForAcks(logs, disks, { atLeast: 10, since: before, timeoutMs: 120_000 });

  await cluster.api.stopVm('tls-vm', true);
  const acked = (await readGuestReport(logs)).acks;
  const verify = await verifyDisks(vm.spec.disks, join(work.path, 'verify'), { tlsDir: join(cluster.host('B').dataDir, 'tls') });
  assert.deepEqual(checkVerify(verify, acked), [], 'every acknowledged record is intact');
});

// Running a fleet (issue 19): `vmferry host drain` moves every VM of a host within one bandwidth
// budget: each VM verified on exactly one destination, the budget held over the drain, the drained
// host refused as a destination until `host undrain`. One RAM status poll's connection is reset on
// the way: the agent client retries it, so no migration fails for it (one did before the retries).
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { chromium } from 'playwright-core';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import type { DrainStatus } from '../../src/controller/drain.ts';
import { testGuestBoot } from '../../src/guest/test-guest.ts';
import { FaultProxy } from '../chaos/fault-proxy.ts';
import { runVmferry } from '../support/cli.ts';
import { FaultCluster } from '../support/fault-cluster.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
/** Small guests: the drain's three migrations run within its budget in seconds, not minutes. */
const small = { memoryMiB: 128, dataMiB: 16 };
const rootMiB = 16;
const budgetMiBs = 6;

let cluster: LocalCluster;
let faults: FaultCluster;
let proxyA: FaultProxy | undefined;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  assert.equal(process.getuid?.(), 0, 'the cluster tests build network namespaces and need root (CI runs as root)');
  work = await makeTempDir('drain');
  cluster = await LocalCluster.start({
    workDir: join(work.path, 'cluster'),
    hostIds: ['A', 'B', 'C'],
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    accel: 'tcg',
    namespaces: true,
    network: { prefix: 'vmfr', subnet: '10.213.95' },
    // The controller reaches A's agent through a proxy that can reset one request's connection.
    agentFront: async ({ id, agentUrl, gateway }) => {
      if (id !== 'A') return agentUrl;
      proxyA = await FaultProxy.start(agentUrl, gateway);
      return proxyA.url;
    },
  });
  faults = new FaultCluster(cluster, work.path);
});
after(async () => {
  await cluster?.stop();
  await proxyA?.close();
  await work?.remove();
});

test('host drain moves three VMs under writes off A within one budget, through a reset status poll; A takes none until undrained', async () => {
  const vms = ['drain1', 'drain2', 'drain3'];
  await Promise.all(vms.map((vm) => faults.startVm(vm, { intervalMs: 0 }, rootMiB, small)));

  // One reset connection on a RAM status poll: retried, it does not fail that VM's migration (it did before).
  assert.ok(proxyA);
  proxyA.arm({ route: '/source/info', mode: 'reset', delayMs: 0 });
  const result = await runVmferry(cluster.controllerUrl, ['--json', 'host', 'drain', 'A', '--parallel', '2', '--bandwidth', String(budgetMiBs)], 180_000);
  assert.equal(result.code, 0, result.stderr);
  const status = JSON.parse(result.stdout) as DrainStatus;
  assert.equal(status.state, 'done');
  assert.ok(proxyA.fired, 'a RAM progress poll was reset');
  assert.deepEqual(status.vms.map((v) => [v.vm, v.state]).sort(), vms.map((vm) => [vm, 'completed']), JSON.stringify(status.vms));
  // The budget held: what the migrations sent, over the time any of them was sending.
  assert.ok(status.transfer && status.transfer.bytes > 3 * 8 * MiB, `the drain moved the guests' data (${JSON.stringify(status.transfer)})`);
  assert.ok(status.transfer.bytesPerSecond <= budgetMiBs * MiB * 1.1, `${(status.transfer.bytesPerSecond / MiB).toFixed(2)} MiB/s against a budget of ${budgetMiBs} MiB/s`);

  const hosts = await cluster.api.hosts();
  assert.equal(hosts.find((h) => h.id === 'A')?.draining, true);
  const moved = status.vms[0];
  assert.ok(moved?.to);
  await assert.rejects(cluster.api.migrate({ vm: moved.vm, to: 'A' }), (err: Error) => /host A is draining/.test(err.message));
  await assert.rejects(cluster.api.createVm('A', { name: 'late', memoryMiB: 64, ...testGuestBoot({ spanMiB: 8 }), disks: [] }), (err: Error) => /host A is draining/.test(err.message));

  for (const v of status.vms) await faults.assertSettled(v.vm, v.to ?? '');

  const undrained = await runVmferry(cluster.controllerUrl, ['host', 'undrain', 'A']);
  assert.equal(undrained.code, 0, undrained.stderr);
  assert.equal((await cluster.api.hosts()).find((h) => h.id === 'A')?.draining, false);
});

test('a drain started from the dashboard in Chromium: live bars for each VM, every one completed and verified, within the budget', async () => {
  const vms = ['dash1', 'dash2', 'dash3'];
  // Whatever the test before left: A takes VMs.
  assert.equal((await runVmferry(cluster.controllerUrl, ['host', 'undrain', 'A'])).code, 0);
  await Promise.all(vms.map((vm) => faults.startVm(vm, { intervalMs: 0 }, rootMiB, small)));
  // Debian's chromium, never a downloaded browser; as root it runs only without its sandbox.
  const browser = await chromium.launch({ executablePath: '/usr/lib/chromium/chromium', args: ['--no-sandbox'] });
  let drainId: string;
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1300 } });
    const pageErrors: string[] = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));
    await page.goto(`${cluster.controllerUrl}/ui/`);
    await page.getByTestId('live-state').getByText('live', { exact: true }).waitFor();
    // Every percentage a drain bar shows, as it shows it: live bars pass through values between 0 and 100.
    await page.evaluate(`{
      const seen = (window.drainPercents = new Set());
      new MutationObserver(() => {
        for (const bar of document.querySelectorAll('[data-testid=drain-bar]')) seen.add(Number(bar.getAttribute('data-percent')));
      }).observe(document.body, { subtree: true, childList: true, attributes: true });
    }`);
    const hostA = page.locator('tr[data-host="A"]');
    await hostA.getByRole('combobox').selectOption('2');
    await hostA.getByRole('textbox').fill(String(budgetMiBs));
    await hostA.getByRole('button', { name: 'Drain' }).click();
    const drain = page.getByTestId('drain').first();
    await drain.waitFor();
    drainId = (await drain.getAttribute('data-drain')) as string;
    await page.locator(`[data-testid=drain][data-drain="${drainId}"][data-state="done"]`).waitFor({ timeout: 240_000 });
    const rows = await Promise.all(vms.map(async (vm) => [vm, await drain.locator(`tr[data-vm="${vm}"] [data-testid=drain-state]`).innerText(), await drain.locator(`tr[data-vm="${vm}"] [data-testid=drain-bar]`).getAttribute('data-percent')]));
    assert.deepEqual(rows, vms.map((vm) => [vm, 'completed', '100']));
    const percents = await page.evaluate<number[]>('[...window.drainPercents]');
    assert.ok(percents.some((p) => p > 0 && p < 100), `the bars moved while the drain ran (seen: ${percents.sort((a, b) => a - b).join(', ')})`);
    // The host list followed: A is draining, and the Undrain button is there.
    await hostA.getByRole('button', { name: 'Undrain' }).waitFor();
    assert.deepEqual(pageErrors, []);
  } finally {
    await browser.close();
  }
  const status = await cluster.api.drain(drainId);
  assert.deepEqual(status.vms.map((v) => [v.vm, v.state]).sort(), vms.map((vm) => [vm, 'completed']), JSON.stringify(status.vms));
  assert.ok(status.transfer && status.transfer.bytesPerSecond <= budgetMiBs * MiB * 1.1, `${JSON.stringify(status.transfer)} against a budget of ${budgetMiBs} MiB/s`);
  for (const v of status.vms) await faults.assertSettled(v.vm, v.to ?? '');
  assert.equal((await runVmferry(cluster.controllerUrl, ['host', 'undrain', 'A'])).code, 0);
});

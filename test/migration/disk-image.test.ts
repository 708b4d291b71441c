// A user's VM, end to end: booted by SeaBIOS from a real disk image (MBR,
// SYSLINUX, the Debian kernel, the test guest: scripts/build-test-disk.sh),
// its root disk local (an imported image, or an overlay on a shared base) and
// a data disk shared, migrated A → B while the guest writes, then stopped and
// booted again on B from the migrated disk. Two hosts in network namespaces
// of their own, real QEMU and agents.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { constants, createReadStream } from 'node:fs';
import { readFile, readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pino from 'pino';
import type { CreateVmRequest } from '../../src/api/agent-types.ts';
import { renderPlan } from '../../src/cli/render.ts';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import { checkVerify, readGuestReport, testGuestDiskImage, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import { imageInfo } from '../../src/storage/local-pool.ts';
import { runProgram } from '../../src/util/run.ts';
import { FaultCluster } from '../support/fault-cluster.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
const bootImage = testGuestDiskImage();
let cluster: LocalCluster;
let vms: FaultCluster;
let work: { path: string; remove(): Promise<void> };

before(async () => {
  assert.equal(process.getuid?.(), 0, 'this test builds network namespaces and needs root (CI runs as root)');
  work = await makeTempDir('disk-image');
  cluster = await LocalCluster.start({
    workDir: join(work.path, 'cluster'),
    hostIds: ['A', 'B'],
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    // No KVM probe at each agent start (3 s where KVM hangs): test/qemu/accel.test.ts covers --accel auto.
    accel: 'tcg',
    namespaces: true,
    network: { prefix: 'vmfi', subnet: '10.213.61' },
  });
  vms = new FaultCluster(cluster, work.path);
});

after(async () => {
  await cluster?.stop();
  await work?.remove();
});

async function sha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

function storageServer(): { type: 'inet'; host: string; port: number } {
  return { type: 'inet', host: cluster.storageNbd.host, port: cluster.storageNbd.port };
}

/** Creates `vm` on A, booting from its disk root, with the shared volume VM-data as disk data; starts it and waits until the guest writes to both. */
async function startFromDisk(vm: string, root: NonNullable<CreateVmRequest['disks'][number]['local']>): Promise<void> {
  await cluster.createVolume(`${vm}-data`, 64 * MiB);
  await cluster.api.createVm('A', {
    name: vm,
    memoryMiB: 192,
    // ttyS1 carries the test guest's reports, whatever booted it.
    serialPorts: 2,
    boot: { kind: 'disk', diskId: 'root' },
    disks: [
      { id: 'root', local: root },
      { id: 'data', shared: { server: storageServer(), export: `${vm}-data` } },
    ],
  });
  const info = await cluster.api.startVm(vm);
  const cmdline = (await readFile(`/proc/${info.pid}/cmdline`, 'utf8')).split('\0');
  assert.ok(!cmdline.includes('-kernel'), 'the firmware boots the disk: no -kernel');
  await waitForAcks(vms.reportLogs(vm), ['root', 'data'], { atLeast: 20, timeoutMs: 180_000 });
}

/** Migrates `vm` A → B while its guest writes; returns the report of the completed migration. */
async function migrateToB(vm: string) {
  const { id } = await cluster.api.migrate({ vm, to: 'B' });
  const record = await vms.finalRecord(id as string);
  assert.equal(record.phase, 'completed', record.report?.error?.message);
  const report = record.report;
  assert.ok(report);
  await vms.assertRunsOnlyOn(vm, 'B');
  // Filled through the page cache, the copy is then opened as the disk asks (cache=none: O_DIRECT) before the guest runs on it.
  const info = await cluster.api.vm(vm);
  const root = info.spec.disks.find((d) => d.id === 'root');
  assert.ok(info.pid !== null && root?.source.kind === 'file' && (root.cache ?? 'none') === 'none');
  assert.equal(await openedDirect(info.pid, root.source.path), true, `B's QEMU opens ${root.source.path} with O_DIRECT`);
  return report;
}

/** Whether process `pid` holds `path` open with O_DIRECT, as /proc says; undefined when it does not hold it. */
async function openedDirect(pid: number, path: string): Promise<boolean | undefined> {
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    if ((await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')) !== path) continue;
    const flags = /^flags:\s*([0-7]+)/m.exec(await readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8'))?.[1];
    return flags !== undefined && (parseInt(flags, 8) & constants.O_DIRECT) !== 0;
  }
  return undefined;
}

/** Stops the VM, checks every acknowledged record with verify mode, then boots it again on B from its migrated disk. */
async function stopVerifyAndReboot(vm: string): Promise<void> {
  await cluster.api.stopVm(vm, true);
  const acked = (await readGuestReport(vms.reportLogs(vm))).acks;
  const spec = (await cluster.api.vm(vm)).spec;
  const verify = await verifyDisks(spec.disks, join(work.path, `verify-${vm}`));
  assert.deepEqual(checkVerify(verify, acked), [], 'every acknowledged record is intact');

  // The report log starts afresh with the new QEMU: these acks come from the second boot alone.
  const info = await cluster.api.startVm(vm);
  assert.equal(info.host, 'B');
  const report = await waitForAcks(vms.reportLogs(vm), ['root', 'data'], { atLeast: 10, timeoutMs: 180_000 });
  assert.deepEqual(report.ready?.sort(), ['data', 'root'], 'the guest booted from the migrated disk and writes again');
  await cluster.api.stopVm(vm, true);
  await cluster.api.deleteVm(vm);
  await cluster.removeVolume(`${vm}-data`, { force: true });
}

test('a VM booted from an imported disk image migrates with a shared data disk, and boots again from the migrated disk', async (t) => {
  const imageHash = await sha256(bootImage);
  await startFromDisk('img', { import: bootImage });
  const report = await migrateToB('img');
  assert.deepEqual(
    report.disks.map((d) => [d.id, d.operation]),
    [['root', 'mirror'], ['data', 'reattach']],
  );
  assert.equal(report.disks.find((d) => d.id === 'data')?.bytesSent, 0);
  t.diagnostic(`imported root: mirror sent ${report.disks.find((d) => d.id === 'root')?.bytesSent} bytes; downtime ${report.downtimeMs} ms`);
  await stopVerifyAndReboot('img');
  assert.equal(await sha256(bootImage), imageHash, 'the imported file was never written');
});

test('an overlay on a shared base: only the overlay moves, the base is re-attached and never written', async (t) => {
  await cluster.createVolume('golden', 128 * MiB);
  // The golden image onto the shared volume, as a user uploads one.
  await runProgram('qemu-img', ['convert', '-q', '-n', '-f', 'qcow2', '-O', 'raw', bootImage, `nbd://${cluster.storageNbd.host}:${cluster.storageNbd.port}/golden`]);
  const baseFile = join(cluster.workDir, 'storage', 'volumes', 'golden.raw');
  const baseHash = await sha256(baseFile);

  await startFromDisk('ovl', { base: 'golden', baseServer: storageServer() });
  const { plan } = await cluster.api.migrate({ vm: 'ovl', to: 'B', dryRun: true });
  assert.deepEqual(plan.refusals, []);
  const root = plan.disks.find((d) => d.id === 'root');
  assert.equal(root?.operation, 'mirror');
  assert.equal(root?.mirrorSync, 'top');
  assert.deepEqual(root?.base, { export: `nbd://${cluster.storageNbd.host}:${cluster.storageNbd.port}/golden`, virtualSize: 128 * MiB, reachable: true });
  assert.ok(root.bytesToCopy < 64 * MiB, `the plan copies the overlay's own data only (${root.bytesToCopy} bytes)`);
  assert.match(renderPlan(plan), /root \(base\)\s*│ shared\s*│ reattach/);

  const report = await migrateToB('ovl');
  const sent = report.disks.find((d) => d.id === 'root');
  assert.equal(sent?.base, root.base?.export);
  const overlay = (await cluster.api.vm('ovl')).spec.disks.find((d) => d.id === 'root')?.source;
  assert.ok(overlay?.kind === 'file' && overlay.path.startsWith(join(cluster.host('B').dataDir, 'pool')));
  assert.deepEqual(overlay.backing, { server: storageServer(), export: 'golden' }, 'the overlay on B reads through the same base');
  const allocated = (await imageInfo(overlay.path, 'qcow2', { ownDataOnly: true })).allocatedBytes;
  assert.ok(sent && sent.bytesSent > 0 && sent.bytesSent <= 1.1 * allocated, `the mirror sent ${sent?.bytesSent} bytes for an overlay of ${allocated} allocated bytes`);
  t.diagnostic(`overlay: planned ${root.bytesToCopy} bytes, mirror sent ${sent.bytesSent}, ${allocated} allocated on B; base ${root.base?.virtualSize} bytes, none sent`);

  await stopVerifyAndReboot('ovl');
  assert.equal(await sha256(baseFile), baseHash, 'the base volume is byte for byte what it was');
  await cluster.removeVolume('golden', { force: true });
});

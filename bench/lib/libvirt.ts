/**
 * libvirt 9.0 as a third migration method: two libvirtd daemons, one per
 * "host", each in its own network namespace (libvirt refuses loopback
 * migration addresses) and its own mount namespace (its own /etc/libvirt,
 * /run/libvirt, /var/lib/libvirt, and the local disk directory at the same path
 * on both sides but backed by different directories: --copy-storage-all
 * expects the destination image at the source's path). The hosts sit on a
 * bridge of our own (10.213.61.0/24); the storage server listens on the
 * bridge's address. Migration:
 *
 *   virsh -c qemu+tcp://A/system migrate --live --copy-storage-all
 *         --migrate-disks vda VM qemu+tcp://B/system tcp://B
 *
 * Needs root, `libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients` and
 * the libvirt-qemu user and group (Debian's libvirt-daemon-system makes them;
 * scripts/setup.sh installs all four).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, openSync, closeSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { guestKernelAppend, testGuestPaths, waitForAcks } from '../../src/guest/test-guest.ts';
import { imageInfo } from '../../src/storage/local-pool.ts';
import { StorageServer } from '../../src/storage/server.ts';
import type { Cleanup } from '../../test/support/cleanup.ts';
import { makeTempDir } from '../../test/support/temp.ts';
import { ackGaps, watchAcks } from './ack-watch.ts';
import { execFile, hostSync, mib, nonZeroPageBytes } from './common.ts';
import { fillImage, volumeFile } from './layout.ts';
import type { RunResult, Scenario } from './run-types.ts';

const subnet = '10.213.61';
const bridge = 'vfbbr';
const hosts = [
  { name: 'a', namespace: 'vfb-a', address: `${subnet}.2`, outside: 'vfb0h', inside: 'vfb0n' },
  { name: 'b', namespace: 'vfb-b', address: `${subnet}.3`, outside: 'vfb1h', inside: 'vfb1n' },
] as const;
export const libvirtGateway = `${subnet}.1`;

/** Why libvirt cannot run here, or undefined when it can. */
export async function libvirtMissing(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return 'needs root (network and mount namespaces)';
  for (const tool of ['libvirtd', 'virsh', 'unshare', 'ip']) {
    if (!(await execFile('which', [tool]).then(() => true, () => false))) return `${tool} is not installed`;
  }
  for (const [db, name] of [['passwd', 'libvirt-qemu'], ['group', 'libvirt-qemu']]) {
    if (!(await execFile('getent', [db as string, name as string]).then(() => true, () => false))) return `no ${db} entry ${name} (libvirt-daemon-system creates it)`;
  }
  return undefined;
}

async function ip(...args: string[]): Promise<void> {
  await execFile('ip', args, { timeout: 10_000 });
}

export async function virsh(host: 'a' | 'b', ...args: string[]): Promise<string> {
  const address = hosts.find((h) => h.name === host)?.address ?? '';
  const { stdout } = await execFile('virsh', ['-c', `qemu+tcp://${address}/system`, ...args], { timeout: 600_000 });
  return stdout;
}

export interface LibvirtHosts {
  dir: string;
  /** The directory that is the local disk directory on host `h`, as seen from here. */
  diskDirOf(h: 'a' | 'b'): string;
  /** The path every host uses for its local disks (bind-mounted per host). */
  diskPath: string;
}

/** Creates the bridge, both namespaces and both daemons; registers their removal on `cleanup`. */
export async function startLibvirtHosts(cleanup: Cleanup): Promise<LibvirtHosts> {
  const temp = await makeTempDir('bench-libvirt');
  cleanup.add('remove libvirt temp dir', () => temp.remove());
  const dir = temp.path;
  const diskPath = join(dir, 'disk');
  mkdirSync(diskPath);
  mkdirSync(join(dir, 'logs'));
  // Leftovers of a run that was killed go first.
  for (const h of hosts) await ip('netns', 'del', h.namespace).catch(() => undefined);
  await ip('link', 'del', bridge).catch(() => undefined);
  await ip('link', 'add', bridge, 'type', 'bridge');
  cleanup.add('remove the bridge', () => ip('link', 'del', bridge));
  await ip('addr', 'add', `${libvirtGateway}/24`, 'dev', bridge);
  await ip('link', 'set', bridge, 'up');
  const daemons: ChildProcess[] = [];
  for (const [index, h] of hosts.entries()) {
    await ip('netns', 'add', h.namespace);
    cleanup.add(`remove namespace ${h.namespace}`, () => ip('netns', 'del', h.namespace));
    await ip('link', 'add', h.outside, 'type', 'veth', 'peer', 'name', h.inside);
    cleanup.add(`remove link ${h.outside}`, () => ip('link', 'del', h.outside).catch(() => undefined));
    await ip('link', 'set', h.inside, 'netns', h.namespace);
    await ip('link', 'set', h.outside, 'master', bridge);
    await ip('link', 'set', h.outside, 'up');
    await ip('-n', h.namespace, 'addr', 'add', `${h.address}/24`, 'dev', h.inside);
    await ip('-n', h.namespace, 'link', 'set', h.inside, 'up');
    await ip('-n', h.namespace, 'link', 'set', 'lo', 'up');
    const home = join(dir, h.name);
    for (const sub of ['etc', 'run', 'lib', 'cache', 'log', 'disk']) mkdirSync(join(home, sub), { recursive: true });
    writeFileSync(join(home, 'etc', 'libvirtd.conf'), [
      'listen_tls = 0', 'listen_tcp = 1', 'auth_tcp = "none"', `listen_addr = "${h.address}"`,
      // Both daemons run on one machine: distinct host UUIDs, or libvirt refuses to migrate "to itself".
      `host_uuid = "00000000-0000-4000-8000-00000000000${index + 1}"`,
      'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"', '',
    ].join('\n'));
    writeFileSync(join(home, 'etc', 'qemu.conf'), [
      'user = "root"', 'group = "root"', 'dynamic_ownership = 0', 'remember_owner = 0', 'security_driver = "none"',
      // No systemd here, and no private /dev per QEMU: keep libvirt's sandboxing out of the way.
      'cgroup_controllers = [ ]', 'namespaces = [ ]', 'stdio_handler = "file"', '',
    ].join('\n'));
    const binds = [['etc', '/etc/libvirt'], ['run', '/run/libvirt'], ['lib', '/var/lib/libvirt'], ['cache', '/var/cache/libvirt'], ['log', '/var/log/libvirt'], ['disk', diskPath]];
    const script = [
      'set -e',
      ...binds.map(([, target]) => `mkdir -p ${target as string}`),
      ...binds.map(([source, target]) => `mount --bind ${join(home, source as string)} ${target as string}`),
      `exec libvirtd -f /etc/libvirt/libvirtd.conf --listen --pid-file ${join(home, 'libvirtd.pid')}`,
    ].join('\n');
    const log = openSync(join(home, 'daemon.log'), 'a');
    let daemon: ChildProcess;
    try {
      daemon = spawn('ip', ['netns', 'exec', h.namespace, 'unshare', '-m', '--propagation', 'private', 'bash', '-c', script], { stdio: ['ignore', log, log] });
    } finally {
      closeSync(log);
    }
    daemons.push(daemon);
    cleanup.add(`stop libvirtd ${h.name}`, async () => {
      if (daemon.exitCode !== null || daemon.signalCode !== null) return;
      const exited = new Promise((done) => daemon.once('exit', done));
      daemon.kill('SIGTERM');
      await Promise.race([exited, sleep(10_000)]);
      if (daemon.exitCode === null && daemon.signalCode === null) daemon.kill('SIGKILL');
    });
  }
  // The mount points made for the daemons in the root namespace's view (empty directories) go too.
  cleanup.add('remove libvirt mount points', async () => {
    for (const target of ['/run/libvirt', '/var/lib/libvirt', '/var/cache/libvirt', '/var/log/libvirt']) await execFile('rmdir', [target]).catch(() => undefined);
  });
  for (const h of hosts) {
    for (let i = 0; ; i++) {
      if (await virsh(h.name, 'version').then(() => true, () => false)) break;
      if (i >= 100) {
        const tail = (file: string): Promise<string> => readFile(join(dir, h.name, file), 'utf8').then((t) => t.split('\n').slice(-6).join('\n'), () => '');
        throw new Error(`libvirtd on ${h.name} did not start:\n${await tail('daemon.log')}\n${await tail('log/libvirtd.log')}`);
      }
      await sleep(200);
    }
  }
  return { dir, diskPath, diskDirOf: (h) => join(dir, h, 'disk') };
}

function domainXml(name: string, scenario: Scenario, diskPath: string, nbdPort: number, logs: string): string {
  const { kernel, initrd } = testGuestPaths();
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>${scenario.memoryMiB}</memory>
  <vcpu>${scenario.vcpus ?? 1}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${kernel}</kernel>
    <initrd>${initrd}</initrd>
    <cmdline>${guestKernelAppend(scenario.guest)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='${join(diskPath, `${name}-local0.qcow2`)}'/>
      <target dev='vda' bus='virtio'/>
      <serial>local0</serial>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='shared0'><host name='${libvirtGateway}' port='${nbdPort}'/></source>
      <target dev='vdb' bus='virtio'/>
      <serial>shared0</serial>
    </disk>
    <serial type='file'><source path='${join(logs, `${name}-console.log`)}' append='on'/><target port='0'/></serial>
    <serial type='file'><source path='${join(logs, `${name}-report.log`)}' append='on'/><target port='1'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

/** Fields of `virsh domjobinfo --rawstats`: "name: value" lines. */
function rawStats(text: string): Map<string, number> {
  const stats = new Map<string, number>();
  for (const line of text.split('\n')) {
    const match = /^\s*(\S+)\s*:\s*(-?\d+)\s*$/.exec(line);
    if (match) stats.set(match[1] as string, Number(match[2]));
  }
  return stats;
}

async function ramInUseVia(host: 'a' | 'b', name: string, memoryMiB: number): Promise<number> {
  const path = `/dev/shm/vmferry-bench-ram-libvirt-${host}-${process.pid}`;
  try {
    await virsh(host, 'qemu-monitor-command', name, JSON.stringify({ execute: 'pmemsave', arguments: { val: 0, size: memoryMiB * mib, filename: path } }));
    return await nonZeroPageBytes(path);
  } finally {
    await execFile('rm', ['-f', path]);
  }
}

/**
 * One libvirt migration of the scenario's VM, measured as in migration-run.ts where libvirt lets us.
 * `migrateFlags` go to `virsh migrate` after its own (e.g. `--postcopy --postcopy-after-precopy`).
 */
export async function runLibvirtOnce(lv: LibvirtHosts, scenario: Scenario, cleanup: Cleanup, migrateFlags: string[] = []): Promise<RunResult> {
  const name = `lv-${scenario.name}`;
  const source = join(lv.diskDirOf('a'), `${name}-local0.qcow2`);
  const target = join(lv.diskDirOf('b'), `${name}-local0.qcow2`);
  await execFile('qemu-img', ['create', '-q', '-f', 'qcow2', source, `${scenario.localSizeMiB}M`]);
  cleanup.add('remove source image', () => execFile('rm', ['-f', source]));
  await fillImage(source, 'qcow2', scenario, scenario.localFillMiB);
  // libvirt copies into an image that must already exist at the same path on B.
  await execFile('qemu-img', ['create', '-q', '-f', 'qcow2', target, `${scenario.localSizeMiB}M`]);
  cleanup.add('remove target image', () => execFile('rm', ['-f', target]));
  const storageDir = await makeTempDir('bench-libvirt-storage');
  cleanup.add('remove storage dir', () => storageDir.remove());
  const storage = await StorageServer.start({ dataDir: storageDir.path, logger: pino({ level: 'silent' }), nbd: { host: libvirtGateway, port: 0 } });
  cleanup.add('stop the storage server', () => storage.close());
  await storage.volumes.create('shared0', scenario.sharedSizeMiB * mib, false);
  await fillImage(volumeFile(storageDir.path, 'shared0'), 'raw', scenario, scenario.sharedFillMiB ?? 0);
  const logs = join(lv.dir, 'logs');
  const xml = join(lv.dir, `${name}.xml`);
  writeFileSync(xml, domainXml(name, scenario, lv.diskPath, storage.addresses.nbdPort as number, logs));
  writeFileSync(join(logs, `${name}-report.log`), '');
  await hostSync();
  // Persistent on A, so A keeps the completed job's statistics after the guest has left.
  await virsh('a', 'define', xml);
  cleanup.add('undefine on A', () => virsh('a', 'undefine', name).catch(() => undefined));
  await virsh('a', 'start', name);
  cleanup.add('destroy on A', () => virsh('a', 'destroy', name).catch(() => undefined));
  cleanup.add('destroy on B', () => virsh('b', 'destroy', name).catch(() => undefined));
  const report = join(logs, `${name}-report.log`);
  const booted = Date.now();
  await waitForAcks([report], ['local0', 'shared0'], { atLeast: scenario.warmupAcks, timeoutMs: 180_000 });
  // A's and B's QEMU log the report channel into the same file (the logs directory is not per host).
  const acks = watchAcks([report]);
  cleanup.add('stop timing acks', () => acks.stop().then(() => undefined));
  await sleep(Math.max((scenario.warmupMs ?? 0) - (Date.now() - booted), 2000));
  const ramInUseBeforeBytes = await ramInUseVia('a', name, scenario.memoryMiB);
  await hostSync();

  // What the bridge hands to B's namespace: the RAM stream and the mirror's NBD writes (and B's few shared-disk replies).
  const txBytes = (): Promise<number> => readFile(`/sys/class/net/${hosts[1].outside}/statistics/tx_bytes`, 'utf8').then(Number);
  const txBefore = await txBytes();
  const t0 = performance.now();
  await virsh('a', 'migrate', '--live', '--copy-storage-all', '--migrate-disks', 'vda', ...migrateFlags, name, `qemu+tcp://${hosts[1].address}/system`, `tcp://${hosts[1].address}`);
  const totalMs = performance.now() - t0;
  const bridgeToDestinationBytes = (await txBytes()) - txBefore;
  const stats = rawStats(await virsh('a', 'domjobinfo', name, '--completed', '--rawstats', '--keep-completed'));
  const ramInUseBytes = await ramInUseVia('b', name, scenario.memoryMiB);
  const before = (await waitForAcks([report], ['local0', 'shared0'], { atLeast: 0, timeoutMs: 1000 })).acks;
  const guestAlive = await waitForAcks([report], ['local0', 'shared0'], { atLeast: 2, since: before, timeoutMs: 60_000 }).then(() => true, () => false);
  // libvirt's phases are not visible from outside: no mirroring window.
  const gaps = ackGaps(await acks.stop(), t0, t0 + totalMs, Number.NaN, Number.NaN);
  return {
    method: 'libvirt',
    scenario: scenario.name,
    totalMs,
    downtimeMs: stats.get('downtime') ?? Number.NaN,
    pauseMs: Number.NaN,
    ramBytes: stats.get('memory_processed') ?? Number.NaN,
    mirrorBytes: stats.get('disk_processed') ?? Number.NaN,
    // libvirt's job statistics are not split per disk; only vda is selected (--migrate-disks), so the shared disk is not copied.
    sharedBytes: Number.NaN,
    localAllocatedBytes: (await imageInfo(source, 'qcow2')).allocatedBytes,
    ramInUseBytes,
    ramInUseBeforeBytes,
    samples: [],
    marks: [],
    guestAlive,
    bridgeToDestinationBytes,
    attempts: 1,
    ackGapMs: gaps.maxGapMs,
    ackBeforeMs: gaps.beforeMs,
  };
}

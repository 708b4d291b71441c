// `vmferry vm import --libvirt-xml` as a user runs it: --dry-run shows the
// request and what is not carried over and creates nothing (it needs no
// controller at all); without it, the VM is created through the controller.
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import type { NotCarried } from '../../src/import/libvirt.ts';
import { makeTempDir } from '../support/temp.ts';
import { runVmferry, type CliResult } from '../support/cli.ts';

const fixtures = join(import.meta.dirname, '../fixtures/libvirt');
// Nothing listens there: a dry run that tried the controller would fail.
const noController = 'http://127.0.0.1:9';

let temp: Awaited<ReturnType<typeof makeTempDir>>;
let cluster: LocalCluster;

function vmferry(controller: string, ...args: string[]): Promise<CliResult> {
  return runVmferry(controller, args, 120_000);
}

before(async () => {
  temp = await makeTempDir('import-cli');
  // The domain below boots /boot/vmlinuz: the agent must trust /boot for it.
  cluster = await LocalCluster.start({ workDir: temp.path, hostIds: ['A'], logger: pino({ level: 'silent' }), namespaces: false, trustedDirs: ['/boot'], accel: 'tcg' });
});

after(async () => {
  await cluster.stop();
  await temp.remove();
});

test('vm import --dry-run --json prints the request and both lists, with no controller to talk to', async () => {
  const result = await vmferry(noController, '--json', 'vm', 'import', '--libvirt-xml', join(fixtures, 'debian12-q35.xml'), '--host', 'A', '--dry-run');
  assert.equal(result.code, 0, result.stderr);
  const printed = JSON.parse(result.stdout) as { host: string; request: unknown; notCarried: NotCarried[]; ignored: string[] };
  assert.equal(printed.host, 'A');
  assert.deepEqual(printed.request, {
    name: 'debian12',
    vcpus: 2,
    memoryMiB: 2048,
    // This machine's QEMU (7.2) knows the versioned type, so the guest keeps its exact chipset.
    machine: 'pc-q35-7.2',
    cpu: 'Haswell-noTSX-IBRS',
    boot: { kind: 'disk', diskId: 'vda' },
    disks: [{ id: 'vda', local: { import: '/var/lib/libvirt/images/debian12.qcow2', format: 'qcow2' }, cache: 'writeback' }],
    nics: [{ bridge: 'br0', mac: '52:54:00:6b:3c:58' }],
  });
  assert.ok(printed.notCarried.some((n) => n.what === "<graphics type='spice' port='5900' autoport='yes' listen='127.0.0.1'> at /domain/devices/graphics" && /headless/.test(n.why)));
  assert.ok(printed.ignored.some((line) => line.startsWith("<memballoon model='virtio'> at /domain/devices/memballoon:")));
});

test('vm import --dry-run for people: the request, then what is not carried over with why', async () => {
  const result = await vmferry(noController, 'vm', 'import', '--libvirt-xml', join(fixtures, 'legacy-i440fx.xml'), '--host', 'A', '--dry-run');
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /^Would create VM legacy-web on A \(dry run: nothing created\):\n\{\n/);
  assert.match(result.stdout, /\nNot carried over \(\d+\):\n/);
  assert.match(result.stdout, /\n {2}- cpu mode='host-passthrough' at \/domain\/cpu\n {6}'host-passthrough' means/);
  assert.match(result.stdout, /\nIgnored, vmferry has its own \(\d+\):\n/);
});

test('vm import of a file that is not a domain, or not XML: one line naming the problem, exit 1', async () => {
  let result = await vmferry(noController, 'vm', 'import', '--libvirt-xml', join(fixtures, 'truncated.xml'), '--host', 'A', '--dry-run');
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^vmferry: \S*truncated\.xml is not well-formed XML: Expected closing tag 'disk' .*\(line 8, column 3\) \[VMF_INVALID_ARGUMENT\]\n$/);
  result = await vmferry(noController, 'vm', 'import', '--libvirt-xml', join(fixtures, 'network-default.xml'), '--host', 'A', '--dry-run');
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^vmferry: \S*network-default\.xml is a <network>, not a libvirt <domain> definition .*\[VMF_INVALID_ARGUMENT\]\n$/);
  result = await vmferry(noController, 'vm', 'import', '--libvirt-xml', join(fixtures, 'missing.xml'), '--host', 'A', '--dry-run');
  assert.match(result.stderr, /^vmferry: --libvirt-xml \S*missing\.xml: no such file \[VMF_INVALID_ARGUMENT\]\n$/);
});

test('vm import creates the VM through the controller (a shared volume and a kernel), and --dry-run before it created nothing', async () => {
  const { host, port } = cluster.storageNbd;
  await cluster.storage.volumes.create('appliance-data', 16 * 1024 * 1024);
  const xml = join(temp.path, 'appliance.xml');
  await writeFile(
    xml,
    `<domain type='kvm'>
  <name>appliance</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>/boot/vmlinuz</kernel><cmdline>console=ttyS0</cmdline></os>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd' name='appliance-data'><host name='${host}' port='${port}'/></source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <graphics type='vnc' port='-1' autoport='yes'/>
  </devices>
</domain>
`,
  );
  const storageNbd = `${host}:${port}`;
  let result = await vmferry(cluster.controllerUrl, 'vm', 'import', '--libvirt-xml', xml, '--host', 'A', '--storage-nbd', storageNbd, '--dry-run');
  assert.equal(result.code, 0, result.stderr);
  result = await vmferry(cluster.controllerUrl, '--json', 'vm', 'list');
  assert.deepEqual(JSON.parse(result.stdout), [], 'the dry run created nothing');

  result = await vmferry(cluster.controllerUrl, 'vm', 'import', '--libvirt-xml', xml, '--host', 'A', '--storage-nbd', storageNbd);
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /^created VM appliance on A from \S+appliance\.xml\nNot carried over \(1\):\n {2}- <graphics type='vnc' port='-1' autoport='yes'> at \/domain\/devices\/graphics\n/);
  const shown = JSON.parse((await vmferry(cluster.controllerUrl, 'vm', 'show', 'appliance')).stdout) as { host: string; spec: { memoryMiB: number; boot: unknown; disks: unknown[] } };
  assert.equal(shown.host, 'A');
  assert.equal(shown.spec.memoryMiB, 128);
  assert.deepEqual(shown.spec.boot, { kind: 'kernel', kernel: '/boot/vmlinuz', append: 'console=ttyS0' });
  assert.deepEqual(shown.spec.disks, [{ id: 'vda', source: { kind: 'nbd', server: { type: 'inet', host, port }, export: 'appliance-data' }, readOnly: false, cache: 'none' }]);
  assert.equal((await vmferry(cluster.controllerUrl, 'vm', 'rm', 'appliance')).code, 0);
});

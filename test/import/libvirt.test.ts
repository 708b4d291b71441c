// libvirt domain XML → vmferry CreateVmRequest, on domain definitions as
// virt-install, virt-manager and OpenStack Nova write them
// (test/fixtures/libvirt/). What a user cares about: the VM they get (memory,
// CPUs, machine, disks, NICs, boot), and that everything else is named with
// its location and a reason, never dropped without a word.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { Value } from '@sinclair/typebox/value';
import { CreateVmRequestSchema } from '../../src/api/agent-types.ts';
import { VmferryError } from '../../src/errors.ts';
import { fromLibvirtXml, libvirtBytes, type LibvirtImport, type LibvirtImportContext } from '../../src/import/libvirt.ts';
import { parseXml } from '../../src/import/xml-tree.ts';

const fixtures = join(import.meta.dirname, '../fixtures/libvirt');
const storage = { type: 'inet' as const, host: '127.0.0.1', port: 10809 };
// What `qemu-system-x86_64 -machine help` lists on QEMU 7.2, in part.
const machines = ['q35', 'pc-q35-7.2', 'pc-q35-7.1', 'pc', 'pc-i440fx-7.2', 'pc-i440fx-5.2'];

function fixture(name: string): string {
  return readFileSync(join(fixtures, name), 'utf8');
}

function load(name: string, context: Partial<LibvirtImportContext> = {}): LibvirtImport {
  return fromLibvirtXml(fixture(name), { storage, machines, source: name, ...context });
}

function notCarriedAt(result: LibvirtImport, path: string): string | undefined {
  return result.notCarried.find((n) => n.what.endsWith(` at ${path}`))?.why;
}

function ignoredAt(result: LibvirtImport, path: string): boolean {
  return result.ignored.some((line) => line.includes(` at ${path}:`));
}

/** Listed itself, or each of its children listed (memoryBacking's options are named one by one). */
function listed(result: LibvirtImport, path: string): boolean {
  return notCarriedAt(result, path) !== undefined || ignoredAt(result, path) || result.notCarried.some((n) => n.what.includes(` at ${path}/`));
}

/**
 * Every child of <domain> and of <devices> is either carried (a disk or NIC in
 * the request, or a value the mapping reads) or named in one of the two lists.
 */
function assertNothingSilentlyDropped(xml: string, result: LibvirtImport): void {
  const domain = parseXml(xml, 'fixture');
  const readAtTop = new Set(['name', 'memory', 'currentMemory', 'vcpu', 'os', 'cpu', 'features', 'clock', 'devices']);
  const carriedDisks = new Set(result.request.disks.map((d) => d.id));
  const carriedMacs = new Set((result.request.nics ?? []).map((n) => n.mac));
  const devices = domain.children.find((c) => c.name === 'devices')?.children ?? [];
  for (const element of [...domain.children.filter((c) => !readAtTop.has(c.name)), ...devices]) {
    const dev = element.children.find((c) => c.name === 'target')?.attrs.dev;
    const mac = element.children.find((c) => c.name === 'mac')?.attrs.address?.toLowerCase();
    const carried = (element.name === 'disk' && dev !== undefined && carriedDisks.has(dev)) || (element.name === 'interface' && carriedMacs.has(mac));
    assert.ok(carried || listed(result, element.path), `${element.path} is neither carried nor listed`);
  }
}

function assertValidRequest(result: LibvirtImport): void {
  const errors = [...Value.Errors(CreateVmRequestSchema, result.request)].map((e) => `${e.path}: ${e.message}`);
  assert.deepEqual(errors, [], 'the request passes the controller\'s own schema');
}

test('a virt-install\'ed q35 Debian guest: qcow2 disk, bridge NIC with its MAC, CPU model; SPICE, channels, sound and USB redirection listed', () => {
  const result = load('debian12-q35.xml');
  assert.deepEqual(result.request, {
    name: 'debian12',
    vcpus: 2,
    memoryMiB: 2048,
    machine: 'pc-q35-7.2',
    cpu: 'Haswell-noTSX-IBRS',
    boot: { kind: 'disk', diskId: 'vda' },
    disks: [{ id: 'vda', local: { import: '/var/lib/libvirt/images/debian12.qcow2', format: 'qcow2' }, cache: 'writeback' }],
    nics: [{ bridge: 'br0', mac: '52:54:00:6b:3c:58' }],
  });
  assertValidRequest(result);
  for (const path of ['/domain/devices/graphics', '/domain/devices/channel[1]', '/domain/devices/channel[2]', '/domain/devices/sound', '/domain/devices/audio', '/domain/devices/video', '/domain/devices/redirdev[1]', '/domain/devices/redirdev[2]', '/domain/devices/rng', '/domain/uuid', '/domain/cpu/feature']) {
    assert.ok(notCarriedAt(result, path), `${path} is listed as not carried`);
  }
  assert.match(notCarriedAt(result, '/domain/devices/graphics') ?? '', /headless/);
  assert.match(notCarriedAt(result, '/domain/devices/channel[1]') ?? '', /guest agent/);
  for (const path of ['/domain/devices/controller[1]', '/domain/devices/controller[5]', '/domain/devices/serial', '/domain/devices/console', '/domain/devices/memballoon', '/domain/devices/input[1]', '/domain/devices/emulator', '/domain/seclabel[1]']) {
    assert.ok(ignoredAt(result, path), `${path} is listed as ignored`);
  }
  assert.equal(notCarriedAt(result, '/domain/devices/controller[1]'), undefined, 'a harmless default is not in the not-carried list');
  assertNothingSilentlyDropped(fixture('debian12-q35.xml'), result);
});

test('a versioned q35 machine type this QEMU does not know (or no QEMU to ask) becomes q35, and says so', () => {
  let result = load('debian12-q35.xml', { machines: ['q35', 'pc-q35-7.1'] });
  assert.equal(result.request.machine, 'q35');
  assert.match(notCarriedAt(result, '/domain/os/type') ?? '', /this QEMU does not know it/);
  result = load('debian12-q35.xml', { machines: undefined });
  assert.equal(result.request.machine, 'q35');
  assert.match(notCarriedAt(result, '/domain/os/type') ?? '', /no QEMU here could be asked/);
});

test('an i440fx VM with a raw IDE disk, a cdrom and a host-passthrough CPU: its i440FX machine kept, no CPU model, the cdrom and passthrough named with why', () => {
  const result = load('legacy-i440fx.xml');
  assert.deepEqual(result.request, {
    name: 'legacy-web',
    vcpus: 1,
    memoryMiB: 1024,
    machine: 'pc-i440fx-5.2',
    boot: { kind: 'disk', diskId: 'hda' },
    disks: [
      { id: 'hda', local: { import: '/srv/vms/legacy-web.img', format: 'raw' }, cache: 'none' },
      { id: 'vdb', local: { import: '/srv/vms/legacy-web-static.img', format: 'raw' }, cache: 'writethrough', readOnly: true },
    ],
  });
  assertValidRequest(result);
  assert.equal(notCarriedAt(result, '/domain/os/type'), undefined, 'the guest keeps the chipset it was installed on');
  assert.equal(load('legacy-i440fx.xml', { machines: ['q35', 'pc'] }).request.machine, 'pc', 'a QEMU without pc-i440fx-5.2 runs its current i440FX');
  assert.match(notCarriedAt(result, '/domain/cpu') ?? '', /host-passthrough.*cannot be migrated by name/);
  assert.match(notCarriedAt(result, '/domain/devices/disk[2]') ?? '', /no removable media.*debian-12\.8\.0-amd64-netinst\.iso/);
  assert.match(notCarriedAt(result, '/domain/devices/disk[1]/target') ?? '', /virtio-blk/);
  assert.match(notCarriedAt(result, '/domain/devices/interface') ?? '', /host bridges only.*mac=52:54:00:a1:b2:c3/);
  assert.match(notCarriedAt(result, '/domain/os/boot[1]') ?? '', /boots from a disk/, 'boot from cdrom, first in <os>, is named');
  assert.match(notCarriedAt(result, '/domain/currentMemory') ?? '', /1024 MiB/);
  assert.match(notCarriedAt(result, '/domain/clock') ?? '', /UTC/);
  for (const path of ['/domain/devices/hostdev', '/domain/devices/watchdog', '/domain/devices/graphics', '/domain/on_crash']) assert.ok(notCarriedAt(result, path), path);
  assertNothingSilentlyDropped(fixture('legacy-i440fx.xml'), result);
});

test('a Nova instance: the NBD volume on the cluster\'s storage server is shared, another server\'s and an RBD volume are not; hugepages and pinning named; bridge NICs kept', () => {
  const result = load('nova-instance.xml');
  assert.deepEqual(result.request, {
    name: 'instance-0000002a',
    vcpus: 4,
    memoryMiB: 4096,
    machine: 'pc-q35-7.2',
    cpu: 'Cascadelake-Server',
    boot: { kind: 'disk', diskId: 'vda' },
    disks: [
      { id: 'vda', shared: { server: storage, export: 'volume-3f9c2a1e-8b7d-4c6f-a5e4-d3c2b1a09f8e' }, cache: 'none' },
      { id: 'vdb', local: { import: '/var/lib/nova/instances/8e2d4f1a-7c3b-4a9e-b5d6-1f2e3a4b5c6d/disk.eph0', format: 'qcow2' }, cache: 'none' },
    ],
    nics: [
      { bridge: 'qbr1234abcd-ef', mac: 'fa:16:3e:12:34:56' },
      { bridge: 'brq9f8e7d6c-5b', mac: 'fa:16:3e:65:43:21' },
    ],
  });
  assertValidRequest(result);
  assert.match(notCarriedAt(result, '/domain/devices/disk[3]') ?? '', /10\.20\.0\.5:10809, not on the cluster's storage server \(127\.0\.0\.1:10809\)/);
  assert.match(notCarriedAt(result, '/domain/devices/disk[4]') ?? '', /NBD exports of its storage server/);
  assert.match(notCarriedAt(result, '/domain/memoryBacking/hugepages') ?? '', /ordinary host memory/);
  for (const path of ['/domain/numatune', '/domain/cputune', '/domain/sysinfo', '/domain/cpu/topology', '/domain/cpu/numa', '/domain/devices/disk[5]', '/domain/devices/interface[1]/mtu', '/domain/devices/interface[3]', '/domain/devices/disk[1]/serial']) {
    assert.ok(notCarriedAt(result, path), `${path} is listed as not carried`);
  }
  assertNothingSilentlyDropped(fixture('nova-instance.xml'), result);
});

test('the same Nova instance against another storage server: its NBD root disk is not carried, and the import says the VM would boot its data disk', () => {
  const result = load('nova-instance.xml', { storage: { type: 'inet', host: '10.20.0.9', port: 10809 } });
  assert.deepEqual(result.request.disks.map((d) => d.id), ['vdb']);
  assert.match(notCarriedAt(result, '/domain/devices/disk[1]') ?? '', /127\.0\.0\.1:10809, not on the cluster's storage server \(10\.20\.0\.9:10809\)/);
  assert.deepEqual(result.request.boot, { kind: 'disk', diskId: 'vdb' });
  assert.match(notCarriedAt(result, '/domain/os/boot') ?? '', /the disk it boots \(vda\) is not carried: the VM boots from vdb instead/);
});

test('a kernel in <os> boots the kernel with its initrd and command line', () => {
  const result = load('direct-kernel.xml');
  assert.deepEqual(result.request.boot, { kind: 'kernel', kernel: '/var/lib/appliance/vmlinuz', initrd: '/var/lib/appliance/initrd.img', append: 'console=ttyS0 root=/dev/vda ro quiet' });
  assert.equal(result.request.machine, 'q35');
  // No cache attribute: libvirt leaves QEMU's default, writeback, and that is what the guest ran with.
  assert.deepEqual(result.request.disks.map((d) => d.cache), ['writeback']);
  assert.deepEqual(result.notCarried, []);
  assertValidRequest(result);
});

test('memory follows libvirt\'s unit attribute (KiB by default; KB is 1000, KiB and k are 1024)', () => {
  assert.equal(libvirtBytes('2097152', undefined, 'memory'), 2 * 1024 ** 3);
  assert.equal(libvirtBytes('2048', 'MiB', 'memory'), 2 * 1024 ** 3);
  assert.equal(libvirtBytes('2', 'G', 'memory'), 2 * 1024 ** 3);
  assert.equal(libvirtBytes('2', 'GiB', 'memory'), 2 * 1024 ** 3);
  assert.equal(libvirtBytes('2', 'GB', 'memory'), 2e9);
  assert.equal(libvirtBytes('1000', 'KB', 'memory'), 1e6);
  assert.equal(libvirtBytes('1024', 'k', 'memory'), 1024 ** 2);
  assert.equal(libvirtBytes('1073741824', 'bytes', 'memory'), 1024 ** 3);
  assert.throws(() => libvirtBytes('4', 'parsecs', '/domain/memory'), /unit libvirt does not define: 'parsecs'/);
  assert.throws(() => libvirtBytes('lots', 'KiB', '/domain/memory'), /\/domain\/memory must be a whole number/);
  // 2 GB is not a whole number of MiB: the guest gets the next MiB up, and the import says so.
  const result = fromLibvirtXml(domainXml("<memory unit='GB'>2</memory>"), { storage, machines });
  assert.equal(result.request.memoryMiB, 1908);
  assert.match(notCarriedAt(result, '/domain/memory') ?? '', /whole MiB: the guest gets 1908 MiB/);
});

/** A minimal domain with `extra` inside it: a kernel to boot and no devices unless given. */
function domainXml(extra: string, devices = ''): string {
  return `<domain type='kvm'><name>t</name>${extra.includes('<memory') ? '' : "<memory unit='MiB'>256</memory>"}<os><type arch='x86_64' machine='q35'>hvm</type>${
    devices ? '' : '<kernel>/boot/vmlinuz</kernel>'
  }</os>${extra}<devices>${devices}</devices></domain>`;
}

test('per-device <boot order>: the first carried disk in that order boots; a cdrom or NIC before it is named', () => {
  const devices = `
    <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='sda' bus='sata'/><boot order='1'/></disk>
    <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><model type='virtio'/><boot order='2'/></interface>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/b.qcow2'/><target dev='vdb' bus='virtio'/><boot order='3'/></disk>`;
  const result = fromLibvirtXml(domainXml('', devices), { storage, machines });
  assert.deepEqual(result.request.boot, { kind: 'disk', diskId: 'vdb' });
  assert.match(notCarriedAt(result, '/domain/devices/disk[1]') ?? '', /no removable media/);
  assert.match(result.notCarried.map((n) => n.what).join('\n'), /boot order 1: <disk type='file' device='cdrom'>/);
  assert.match(result.notCarried.map((n) => n.what).join('\n'), /boot order 2: <interface type='bridge'>/);
});

test('bad input is one clear error naming the problem', () => {
  const cases: [string, RegExp][] = [
    [fixture('truncated.xml'), /^truncated\.xml is not well-formed XML: Expected closing tag 'disk' .* \(line 8, column 3\)$/],
    [fixture('network-default.xml'), /^network-default\.xml is a <network>, not a libvirt <domain> definition \(virsh dumpxml NAME gives one\)$/],
    ['', /^empty\.xml is empty$/],
    [`${domainXml('')}\n${domainXml('')}`, /^empty\.xml is not well-formed XML: Multiple possible root nodes found\. \(line 2, column \d+\)$/],
    ['<domain/><domain/>', /^empty\.xml is not well-formed XML: it has 2 top-level elements \(<domain>, <domain>\), not one$/],
    ['<domain type="lxc"><name>c</name></domain>', /describes a 'lxc' domain; vmferry runs QEMU\/KVM/],
    [domainXml('').replace('<name>t</name>', '<name>Win10 Pro</name>'), /the domain's name 'Win10 Pro' is not a valid vmferry VM name .*: give one with --name/],
    [domainXml('').replace("arch='x86_64'", "arch='aarch64'"), /arch 'aarch64': vmferry runs x86_64 virtual machines only/],
    [domainXml('').replace("<memory unit='MiB'>256</memory>", ''), /has no <memory>/],
    [domainXml('').replace('<kernel>/boot/vmlinuz</kernel>', ''), /nothing vmferry can boot/],
  ];
  for (const [xml, message] of cases) {
    const source = message.source.startsWith('^truncated') ? 'truncated.xml' : message.source.startsWith('^network') ? 'network-default.xml' : 'empty.xml';
    assert.throws(
      () => fromLibvirtXml(xml, { storage, machines, source }),
      (err: unknown) => err instanceof VmferryError && err.code === 'VMF_INVALID_ARGUMENT' && message.test(err.message),
      `expected ${message}`,
    );
  }
});

test('--name replaces a domain name vmferry cannot use', () => {
  const xml = domainXml('').replace('<name>t</name>', '<name>Win10 Pro</name>');
  assert.equal(fromLibvirtXml(xml, { storage, machines, name: 'win10' }).request.name, 'win10');
});

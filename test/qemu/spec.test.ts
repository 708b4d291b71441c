import assert from 'node:assert/strict';
import { test } from 'node:test';
import { validateVmSpec } from '../../src/qemu/spec.ts';
import { qemuArguments } from '../../src/qemu/command-line.ts';
import { isTapOf, tapName } from '../../src/qemu/taps.ts';
import { hasCode } from '../../src/errors.ts';

const valid = {
  name: 'web-1',
  vcpus: 1,
  memoryMiB: 256,
  boot: { kind: 'kernel', kernel: '/guest/vmlinuz', initrd: '/guest/initrd', append: 'console=ttyS0' },
  disks: [
    { id: 'root', source: { kind: 'file', path: '/pool/web-1-root.qcow2', format: 'qcow2' } },
    { id: 'data', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: 10809 }, export: 'data' }, cache: 'writeback' },
    { id: 'iso', source: { kind: 'nbd', server: { type: 'unix', path: '/run/storage.sock' }, export: 'iso' }, readOnly: true },
  ],
  nics: [
    { id: 'net0', bridge: 'vmbr0', mac: '52:54:00:ab:cd:01' },
    { id: 'net1', bridge: 'br-storage', mac: '52:54:00:ab:cd:02' },
  ],
  serialLogs: ['/run/web-1/console.log'],
};

function withChange(path: (string | number)[], value: unknown): unknown {
  const copy = structuredClone(valid) as Record<string, unknown>;
  let target = copy as Record<string | number, unknown>;
  for (const key of path.slice(0, -1)) target = target[key] as Record<string | number, unknown>;
  const last = path[path.length - 1] as string | number;
  if (value === undefined) delete target[last];
  else target[last] = value;
  return copy;
}

test('a valid spec comes back unchanged', () => {
  assert.deepEqual(validateVmSpec(valid), valid);
});

test('a field the schema does not name is dropped, not refused: a spec.json another vmferry version wrote still loads', () => {
  const spec = validateVmSpec({ ...withChange(['disks', 0, 'source', 'preallocate'], true) as object, balloon: true });
  assert.deepEqual(spec, valid);
});

const invalidCases: { change: [(string | number)[], unknown]; field: RegExp }[] = [
  { change: [['name'], '../etc'], field: /^invalid VM spec: name must be 1-63 characters.*"\.\.\/etc"/ },
  { change: [['name'], undefined], field: /^invalid VM spec: name must be a non-empty string/ },
  { change: [['vcpus'], 0], field: /^invalid VM spec: vcpus must be an integer from 1 to 64 \(got 0\)/ },
  { change: [['memoryMiB'], '256'], field: /^invalid VM spec: memoryMiB must be an integer/ },
  { change: [['machine'], 'q35; rm -rf /'], field: /^invalid VM spec: machine must be a QEMU machine type/ },
  { change: [['cpu'], 'qemu64,+avx2'], field: /^invalid VM spec: cpu must be a QEMU CPU model name such as "qemu64-v1".*without features \(got "qemu64,\+avx2"\)/ },
  { change: [['cpu'], ''], field: /^invalid VM spec: cpu must be a QEMU CPU model name/ },
  { change: [['disks'], 'root'], field: /^invalid VM spec: disks must be an array/ },
  { change: [['disks', 0, 'id'], 'Root Disk'], field: /^invalid VM spec: disks\[0\]\.id must be 1-20 characters/ },
  { change: [['disks', 1, 'id'], 'root'], field: /^invalid VM spec: disks\[1\]\.id repeats "root"/ },
  { change: [['disks', 0, 'source', 'path'], 'relative.qcow2'], field: /^invalid VM spec: disks\[0\]\.source\.path must be an absolute path/ },
  { change: [['disks', 0, 'source', 'path'], '/a,b.qcow2'], field: /^invalid VM spec: disks\[0\]\.source\.path must not contain a comma/ },
  { change: [['disks', 0, 'source', 'format'], 'vmdk'], field: /^invalid VM spec: disks\[0\]\.source\.format must be "qcow2" or "raw" \(got "vmdk"\)/ },
  { change: [['disks', 0, 'source', 'kind'], 'iscsi'], field: /^invalid VM spec: disks\[0\]\.source\.kind must be "file", "nbd" or "rbd"/ },
  { change: [['disks', 1, 'source', 'server', 'port'], 70000], field: /^invalid VM spec: disks\[1\]\.source\.server\.port must be an integer from 1 to 65535/ },
  { change: [['disks', 2, 'source', 'server', 'type'], 'vsock'], field: /^invalid VM spec: disks\[2\]\.source\.server\.type must be "inet" or "unix"/ },
  { change: [['disks', 1, 'cache'], 'fast'], field: /^invalid VM spec: disks\[1\]\.cache must be one of none, writeback/ },
  { change: [['disks', 2, 'readOnly'], 'yes'], field: /^invalid VM spec: disks\[2\]\.readOnly must be a boolean/ },
  { change: [['disks', 0, 'source', 'backing'], { server: { type: 'inet', host: '127.0.0.1', port: 10809 } }], field: /^invalid VM spec: disks\[0\]\.source\.backing\.export must be a non-empty string/ },
  { change: [['disks', 0, 'source'], { kind: 'file', path: '/pool/r.raw', format: 'raw', backing: { server: { type: 'unix', path: '/s' }, export: 'base' } }], field: /^invalid VM spec: disks\[0\]\.source\.backing needs format "qcow2"/ },
  { change: [['boot', 'kind'], 'pxe'], field: /^invalid VM spec: boot\.kind must be "kernel" or "disk"/ },
  { change: [['boot'], { kind: 'disk', diskId: 'nope' }], field: /^invalid VM spec: boot\.diskId names no disk of this VM/ },
  { change: [['nics', 0, 'bridge'], 'br0; reboot'], field: /^invalid VM spec: nics\[0\]\.bridge must be a host interface name/ },
  { change: [['nics', 0, 'bridge'], 'a-bridge-name-too-long'], field: /^invalid VM spec: nics\[0\]\.bridge must be a host interface name/ },
  { change: [['nics', 1, 'id'], 'net0'], field: /^invalid VM spec: nics\[1\]\.id repeats "net0"/ },
  { change: [['nics', 1, 'mac'], '52:54:00:ab:cd:01'], field: /^invalid VM spec: nics\[1\]\.mac repeats "52:54:00:ab:cd:01"/ },
  { change: [['nics', 0, 'mac'], '52:54:00:ab:cd'], field: /^invalid VM spec: nics\[0\]\.mac must be six lower-case hex pairs/ },
  { change: [['nics', 0, 'mac'], '01:00:5e:00:00:01'], field: /^invalid VM spec: nics\[0\]\.mac must be a unicast address/ },
  { change: [['serialLogs', 0], 'console.log'], field: /^invalid VM spec: serialLogs\[0\] must be an absolute path/ },
];

for (const { change, field } of invalidCases) {
  test(`rejects ${change[0].join('.')} = ${JSON.stringify(change[1])} naming the field`, () => {
    assert.throws(
      () => validateVmSpec(withChange(...change)),
      (err: unknown) => hasCode(err, 'VMF_INVALID_SPEC') && field.test((err as Error).message),
    );
  });
}

test('rejects something that is not an object at all', () => {
  assert.throws(() => validateVmSpec(null), /invalid VM spec: \(root\) must be an object/);
  assert.throws(() => validateVmSpec([valid]), /invalid VM spec: \(root\) must be an object/);
});

test('the command line derives node names, serials and PCI slots from disk ids', () => {
  const args = qemuArguments(validateVmSpec(valid), { mode: 'incoming', qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg', taps: ['tap-a', 'tap-b'] });
  const devices = args.flatMap((arg, i) => (args[i - 1] === '-device' ? [JSON.parse(arg) as Record<string, unknown>] : []));
  assert.deepEqual(
    devices.map((d) => [d.id, d.drive, d.serial, d.addr]),
    [
      ['root', 'disk-root', 'root', '0x10'],
      ['data', 'disk-data', 'data', '0x11'],
      ['iso', 'disk-iso', 'iso', '0x12'],
      ['net0', undefined, undefined, '0x8'],
      ['net1', undefined, undefined, '0x9'],
    ],
  );
  const nodes = args.flatMap((arg, i) => (args[i - 1] === '-blockdev' ? [JSON.parse(arg) as Record<string, unknown>] : []));
  assert.deepEqual(nodes.map((n) => [n['node-name'], n.driver]), [
    ['disk-root-file', 'file'],
    ['disk-root', 'qcow2'],
    ['disk-data', 'nbd'],
    ['disk-iso', 'nbd'],
  ]);
  assert.equal(nodes[3]?.['read-only'], true);
  assert.deepEqual(args.slice(-3), ['-incoming', 'defer', '-S']);
  assert.ok(args.includes('-nodefaults'));
  assert.deepEqual(args.slice(args.indexOf('-accel'), args.indexOf('-accel') + 2), ['-accel', 'tcg']);
});

test('devices sit on the machine type\'s root bus: pcie.0 on q35, pci.0 on pc (QEMU refuses pcie.0 there)', () => {
  const options = { mode: 'run' as const, qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg' as const, taps: ['tap-a', 'tap-b'] };
  const buses = (machine: string | undefined): unknown[] => {
    const args = qemuArguments(validateVmSpec(machine ? { ...valid, machine } : valid), options);
    return args.flatMap((arg, i) => (args[i - 1] === '-device' ? [(JSON.parse(arg) as Record<string, unknown>).bus] : []));
  };
  assert.deepEqual(buses(undefined), Array(5).fill('pcie.0'));
  assert.deepEqual(buses('pc-q35-7.2'), Array(5).fill('pcie.0'));
  assert.deepEqual(buses('pc'), Array(5).fill('pci.0'));
  assert.deepEqual(buses('pc-i440fx-7.2'), Array(5).fill('pci.0'));
});

test('a TCG guest\'s RAM is ordinary private memory under the backend id older agents gave their memfd (so their VMs still migrate)', () => {
  const args = qemuArguments(validateVmSpec(valid), { mode: 'run', qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg', taps: ['tap-a', 'tap-b'] });
  assert.equal(args[args.indexOf('-object') + 1], 'memory-backend-ram,id=vmferry-ram,size=256M');
  assert.equal(args[args.indexOf('-machine') + 1], 'q35,memory-backend=vmferry-ram');
  assert.ok(!args.some((arg) => arg.includes('memfd') || arg.includes('share=on')));
});

test('the CPU model is passed as -cpu MODEL,enforce; a spec without one leaves QEMU its own default', () => {
  const options = { mode: 'run' as const, qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'kvm' as const, taps: ['tap-a', 'tap-b'] };
  const args = qemuArguments(validateVmSpec({ ...valid, cpu: 'Westmere-v1' }), options);
  assert.deepEqual(args.slice(args.indexOf('-cpu'), args.indexOf('-cpu') + 2), ['-cpu', 'Westmere-v1,enforce']);
  assert.deepEqual(args.slice(args.indexOf('-accel'), args.indexOf('-accel') + 2), ['-accel', 'kvm']);
  assert.equal(qemuArguments(validateVmSpec(valid), options).includes('-cpu'), false);
});

function blockdevs(args: string[]): Record<string, unknown>[] {
  return args.flatMap((arg, i) => (args[i - 1] === '-blockdev' ? [JSON.parse(arg) as Record<string, unknown>] : []));
}

test('an overlay on a shared base: the qcow2 node reads through a read-only NBD node of the base, even on a writable disk', () => {
  const base = { server: { type: 'inet' as const, host: '10.0.0.1', port: 10809 }, export: 'debian-12' };
  const spec = validateVmSpec(withChange(['disks', 0, 'source', 'backing'], base));
  assert.deepEqual(spec.disks[0]?.source, { kind: 'file', path: '/pool/web-1-root.qcow2', format: 'qcow2', backing: base });
  const nodes = blockdevs(qemuArguments(spec, { mode: 'run', qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg', taps: ['tap-a', 'tap-b'] }));
  assert.deepEqual(nodes.slice(0, 3).map((n) => [n['node-name'], n.driver]), [
    ['disk-root-file', 'file'],
    ['disk-root-base', 'nbd'],
    ['disk-root', 'qcow2'],
  ]);
  assert.equal(nodes[1]?.export, 'debian-12');
  assert.deepEqual(nodes[1]?.server, { type: 'inet', host: '10.0.0.1', port: '10809' });
  assert.equal(nodes[1]?.['read-only'], true);
  assert.equal(nodes[2]?.backing, 'disk-root-base');
  assert.equal(nodes[2]?.['read-only'], false);
});

test('with a TLS dir, every NBD node of the storage server (shared disk, shared base) goes under TLS to its address; a unix socket is refused', () => {
  const base = { server: { type: 'inet' as const, host: '10.0.0.1', port: 10809 }, export: 'debian-12' };
  const onTcp = withChange(['disks', 0, 'source', 'backing'], base) as typeof valid;
  onTcp.disks.pop();
  const spec = validateVmSpec(onTcp);
  const options = { mode: 'run' as const, qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg' as const, taps: ['tap-a', 'tap-b'] };
  const tlsOf = (nodes: Record<string, unknown>[]): unknown[][] => nodes.filter((n) => n.driver === 'nbd').map((n) => [n['node-name'], n['tls-creds'], n['tls-hostname']]);
  assert.deepEqual(tlsOf(blockdevs(qemuArguments(spec, { ...options, tlsDir: '/var/lib/vmferry/tls' }))), [
    ['disk-root-base', 'vmf-tls-client', '10.0.0.1'],
    ['disk-data', 'vmf-tls-client', '127.0.0.1'],
  ]);
  assert.deepEqual(tlsOf(blockdevs(qemuArguments(spec, options))), [
    ['disk-root-base', undefined, undefined],
    ['disk-data', undefined, undefined],
  ]);
  assert.throws(() => qemuArguments(validateVmSpec(valid), { ...options, tlsDir: '/tls' }), /unix socket \/run\/storage.sock cannot be reached under TLS/);
});

test('booting from a disk: SeaBIOS is pointed at that disk (bootindex 1), no other disk is bootable, no -kernel', () => {
  const spec = validateVmSpec(withChange(['boot'], { kind: 'disk', diskId: 'data' }));
  const args = qemuArguments(spec, { mode: 'run', qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg', taps: ['tap-a', 'tap-b'] });
  const devices = args.flatMap((arg, i) => (args[i - 1] === '-device' ? [JSON.parse(arg) as Record<string, unknown>] : []));
  assert.deepEqual(devices.filter((d) => 'drive' in d).map((d) => [d.id, d.bootindex]), [
    ['root', undefined],
    ['data', 1],
    ['iso', undefined],
  ]);
  for (const flag of ['-kernel', '-initrd', '-append']) assert.ok(!args.includes(flag), `no ${flag}`);
});

test('each NIC is a virtio-net device with its MAC on its own tap; the tap names fit the kernel and differ by VM, NIC and role', () => {
  const args = qemuArguments(validateVmSpec(valid), { mode: 'run', qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg', taps: ['tap-a', 'tap-b'] });
  const netdevs = args.filter((_, i) => args[i - 1] === '-netdev');
  assert.deepEqual(netdevs, [
    'tap,id=netdev-net0,ifname=tap-a,script=no,downscript=no,vhost=off',
    'tap,id=netdev-net1,ifname=tap-b,script=no,downscript=no,vhost=off',
  ]);
  const nics = args.flatMap((arg, i) => (args[i - 1] === '-device' && arg.includes('virtio-net') ? [JSON.parse(arg) as Record<string, unknown>] : []));
  assert.deepEqual(nics.map((n) => [n.id, n.netdev, n.mac]), [['net0', 'netdev-net0', '52:54:00:ab:cd:01'], ['net1', 'netdev-net1', '52:54:00:ab:cd:02']]);
  assert.throws(() => qemuArguments(validateVmSpec(valid), { mode: 'run', qmpSocket: '/q', pidFile: '/p', accel: 'tcg' }), (err: unknown) => hasCode(err, 'VMF_NETWORK'));

  const longName = 'a'.repeat(63);
  const names = new Set([tapName(longName, 7, 'run'), tapName(longName, 7, 'incoming'), tapName(`${longName.slice(1)}b`, 7, 'run'), tapName(longName, 6, 'run')]);
  assert.equal(names.size, 4);
  for (const name of names) assert.ok(name.length <= 15, name);
  assert.equal(tapName('web-1', 0, 'run'), tapName('web-1', 0, 'run'));
  assert.ok(isTapOf('web-1', tapName('web-1', 3, 'incoming')));
  assert.ok(!isTapOf('web-2', tapName('web-1', 3, 'incoming')));
});

test('an RBD disk: an rbd client node with pool, image, conf and user (no key anywhere) under a raw node the device uses, a device that stops the VM on I/O errors; bad names refused', () => {
  const rbd = { kind: 'rbd', pool: 'vms', image: 'web-1-data', conf: '/etc/ceph/ceph.conf', user: 'vmferry' };
  const spec = validateVmSpec(withChange(['disks', 1, 'source'], rbd));
  assert.deepEqual(spec.disks[1]?.source, rbd);
  const args = qemuArguments(spec, { mode: 'run', qmpSocket: '/run/q.sock', pidFile: '/run/q.pid', accel: 'tcg', taps: ['tap-a', 'tap-b'] });
  const client = blockdevs(args).find((n) => n['node-name'] === 'disk-data-file');
  assert.deepEqual(client, { driver: 'rbd', 'node-name': 'disk-data-file', pool: 'vms', image: 'web-1-data', conf: '/etc/ceph/ceph.conf', user: 'vmferry', 'read-only': false, cache: { 'no-flush': false } });
  // The format node keeps the name a device and a migration know a disk by; the client under it can be replaced (rbd-client-swap.ts).
  const format = blockdevs(args).find((n) => n['node-name'] === 'disk-data');
  assert.deepEqual(format, { driver: 'raw', 'node-name': 'disk-data', file: 'disk-data-file', 'read-only': false, cache: { 'no-flush': false } });
  const device = args.map((a) => (a.startsWith('{"driver":"virtio-blk-pci"') ? (JSON.parse(a) as Record<string, unknown>) : undefined)).find((d) => d?.id === 'data');
  assert.equal(device?.drive, 'disk-data');
  assert.equal(device?.werror, 'stop');
  assert.doesNotMatch(args.join(' '), /key/);
  for (const [field, value, message] of [
    ['pool', 'a/b', /disks\[1\]\.source\.pool must be 1-100 characters/],
    ['image', 'x@snap', /disks\[1\]\.source\.image must be/],
    ['conf', 'ceph.conf', /disks\[1\]\.source\.conf must be an absolute path/],
    ['conf', '/etc/ceph:x', /must not contain a colon/],
  ] as const) {
    assert.throws(() => validateVmSpec(withChange(['disks', 1, 'source'], { ...rbd, [field]: value })), (err: unknown) => hasCode(err, 'VMF_INVALID_SPEC') && message.test((err as Error).message));
  }
});

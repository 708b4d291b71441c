// What a request may make an agent touch on its host (src/agent/request-guard.ts), without QEMU:
// host files only in trusted directories, however the path gets out (symlink, `..`, a backing file);
// disks only in the pool or on the storage server; a migration's data only to its destination.
// test/cluster/api.test.ts sends the same refusals over HTTP.
import assert from 'node:assert/strict';
import { mkdir, readdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { checkTargets, RequestGuard } from '../../src/agent/request-guard.ts';
import { VmRegistry } from '../../src/agent/vm-registry.ts';
import { testGuestBoot } from '../../src/guest/test-guest.ts';
import { hasCode } from '../../src/errors.ts';
import type { VmSpec } from '../../src/qemu/spec.ts';
import { runProgram } from '../../src/util/run.ts';
import { makeTempDir } from '../support/temp.ts';

let dir: string;
let temp: Awaited<ReturnType<typeof makeTempDir>>;
let trusted: string;
let guard: RequestGuard;
const storage = { type: 'inet' as const, host: '10.0.0.1', port: 10809 };

const forbidden = (message: RegExp) => (err: unknown) => hasCode(err, 'VMF_FORBIDDEN') && message.test((err as Error).message);

before(async () => {
  temp = await makeTempDir('guard');
  dir = temp.path;
  trusted = join(dir, 'images');
  await mkdir(trusted);
  await mkdir(join(dir, 'agent', 'pool'), { recursive: true });
  await writeFile(join(trusted, 'vmlinuz'), 'a kernel');
  // The operator's trusted directory may itself be a symlink: what it points to is trusted.
  await symlink(trusted, join(dir, 'images-link'));
  guard = await RequestGuard.create({ trustedDirs: [join(dir, 'images-link')], poolDir: join(dir, 'agent', 'pool'), vmsDir: join(dir, 'agent', 'vms'), storageNbd: storage });
});

after(() => temp.remove());

test('a host file in a trusted directory is allowed; one that gets out by symlink or .. is refused, naming where it leads', async () => {
  await guard.hostFile(join(trusted, 'vmlinuz'), 'boot.kernel');
  await guard.hostFile(join(dir, 'images-link', 'vmlinuz'), 'boot.kernel');
  await guard.hostFile(join(trusted, 'not-yet.img'), 'boot.initrd');
  await symlink('/etc/shadow', join(trusted, 'escape'));
  await assert.rejects(guard.hostFile(join(trusted, 'escape'), 'boot.kernel'), forbidden(/boot\.kernel \S+escape \(which resolves to \/etc\/shadow\) is outside the agent's trusted directories \(\S+images\); .*--trusted-dir/));
  await assert.rejects(guard.hostFile(join(trusted, '..', 'images-other', 'x'), 'boot.initrd'), forbidden(/is outside/));
  await assert.rejects(guard.hostFile('/dev/sda', 'boot.kernel'), forbidden(/\/dev\/sda is outside/));
});

test('an agent that trusts no directory refuses every host file and says how to allow it', async () => {
  const none = await RequestGuard.create({ trustedDirs: [], poolDir: join(dir, 'agent', 'pool'), vmsDir: join(dir, 'agent', 'vms'), storageNbd: undefined });
  await assert.rejects(none.hostFile(join(trusted, 'vmlinuz'), 'boot.kernel'), forbidden(/trusts no directory for host files: start it with --trusted-dir DIR/));
  await assert.rejects(RequestGuard.create({ trustedDirs: [join(dir, 'missing')], poolDir: dir, vmsDir: dir, storageNbd: undefined }), (err: unknown) => hasCode(err, 'VMF_INVALID_ARGUMENT') && /--trusted-dir \S+missing/.test((err as Error).message));
});

test('an agent that trusts no directory does not run even the test guest, and creates nothing trying', async () => {
  const dataDir = join(dir, 'untrusting');
  const none = await RequestGuard.create({ trustedDirs: [], poolDir: join(dataDir, 'pool'), vmsDir: join(dataDir, 'vms'), storageNbd: undefined });
  const registry = new VmRegistry('A', dataDir, pino({ level: 'silent' }), { accelerator: 'tcg', reason: 'test' }, none);
  await registry.init();
  await assert.rejects(
    registry.create({ name: 'web', ...testGuestBoot(), disks: [{ id: 'root', local: { sizeBytes: 1 << 20 } }] }),
    forbidden(/boot\.kernel names the host file \S+vmlinux, and this agent trusts no directory for host files: start it with --trusted-dir/),
  );
  assert.deepEqual([...(await readdir(join(dataDir, 'pool'))), ...(await readdir(join(dataDir, 'vms')))], []);
});

test('an image to import whose backing file lies outside the trusted directories is refused', async () => {
  const evil = join(trusted, 'evil.qcow2');
  await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/shadow', '-F', 'raw', evil, '1M']);
  await assert.rejects(guard.importFile(evil, 'disks.root.local.import'), forbidden(/disks\.root\.local\.import's backing file \/etc\/shadow is outside/));
  const base = join(trusted, 'base.raw');
  await runProgram('qemu-img', ['create', '-q', '-f', 'raw', base, '1M']);
  const fine = join(trusted, 'fine.qcow2');
  await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', fine]);
  await guard.importFile(fine, 'disks.root.local.import');
});

test('disks: local images only in the pool, shared volumes only on the storage server', async () => {
  const pool = join(dir, 'agent', 'pool');
  await guard.poolFile(join(pool, 'web-root.qcow2'), 'disk root');
  await assert.rejects(guard.poolFile('/dev/sda', 'disk root'), forbidden(/disk root \/dev\/sda is not in this host's pool/));
  await assert.rejects(guard.poolFile(join(pool, '..', 'vms', 'x.qcow2'), 'disk root'), forbidden(/not in this host's pool/));
  guard.storageServer(storage, 'disk data');
  assert.throws(() => guard.storageServer({ ...storage, port: 22 }, 'disk data'), forbidden(/disk data is on the NBD server 10\.0\.0\.1:22, not on this agent's storage server 10\.0\.0\.1:10809/));
  assert.throws(() => guard.storageServer({ type: 'unix', path: '/run/docker.sock' }, 'disk data'), forbidden(/unix socket \/run\/docker\.sock/));
  const spec: VmSpec = {
    name: 'web', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: join(trusted, 'vmlinuz') },
    disks: [{ id: 'root', source: { kind: 'file', path: join(pool, 'web-root.qcow2'), format: 'qcow2' } }],
    serialLogs: [join(dir, 'agent', 'vms', 'web', 'serial0.log')],
  };
  await guard.spec(spec);
  await assert.rejects(guard.spec({ ...spec, serialLogs: ['/etc/cron.d/web'] }), forbidden(/serial log 0 \/etc\/cron\.d\/web is not in the directory of VM web/));
  // A migration's destination creates what the plan mirrors; a file disk the plan leaves alone would be opened as it is.
  await guard.incoming(spec, { disks: [{ id: 'root', operation: 'mirror' }] });
  await assert.rejects(guard.incoming(spec, { disks: [{ id: 'root', operation: 'reattach' }] }), forbidden(/disk root is the file \S+ and its plan does not mirror it/));
});

test('a migration source sends disks and RAM only to the destination address of its plan', () => {
  const mirror = { diskId: 'root', server: { type: 'inet' as const, host: '10.0.0.2', port: 40000 } };
  checkTargets('10.0.0.2', { mirrors: [mirror], uri: 'tcp:10.0.0.2:49152' });
  assert.throws(() => checkTargets('10.0.0.2', { mirrors: [{ ...mirror, server: { ...mirror.server, host: '10.0.0.66' } }] }), forbidden(/mirror of disk root would go to 10\.0\.0\.66:40000, not to the migration's destination 10\.0\.0\.2/));
  assert.throws(() => checkTargets('10.0.0.2', { mirrors: [{ ...mirror, server: { type: 'unix', path: '/tmp/x.sock' } }] }), forbidden(/unix socket \/tmp\/x\.sock/));
  for (const uri of ['tcp:10.0.0.66:49152', 'tcp:10.0.0.2.evil:1', 'tcp:10.0.0.2', 'tcp:10.0.0.2:1,x=y']) {
    assert.throws(() => checkTargets('10.0.0.2', { uri }), forbidden(/migration stream would go to/), uri);
  }
});

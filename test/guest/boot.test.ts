// The test guest is the judge of every end-to-end test, so it must see a real
// local disk and a real NBD disk, report durable records, and catch corruption.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { checkVerify, reportLogOf, testGuestSpec, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import type { DiskSpec } from '../../src/qemu/spec.ts';
import { Cleanup } from '../support/cleanup.ts';
import { serveWithQemuNbd } from '../support/qemu-nbd.ts';
import { makeTempDir } from '../support/temp.ts';

const cleanup = new Cleanup();
let dir: string;
let disks: DiskSpec[];

before(async () => {
  const temp = await makeTempDir('guest');
  cleanup.add('remove temp dir', () => temp.remove());
  dir = temp.path;
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'local.qcow2'), '64M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'shared.raw'), '32M']);
  const nbd = await serveWithQemuNbd(join(dir, 'shared.raw'), 'raw', dir);
  cleanup.add('stop qemu-nbd', () => nbd.stop());
  disks = [
    { id: 'local0', source: { kind: 'file', path: join(dir, 'local.qcow2'), format: 'qcow2' } },
    { id: 'shared0', source: { kind: 'nbd', server: { type: 'unix', path: nbd.socket }, export: nbd.exportName } },
  ];
});

after(() => cleanup.run());

test('the guest acknowledges durable records on a local and an NBD disk, and verify finds every one', async () => {
  const spec = testGuestSpec('boot', disks, dir, { mode: 'workload', spanMiB: 8 });
  const vm = await QemuProcess.start(spec, { runDir: join(dir, 'run') });
  let acked: Map<string, number>;
  try {
    const report = await waitForAcks([reportLogOf(spec)], ['local0', 'shared0'], { atLeast: 50, timeoutMs: 60_000 });
    assert.deepEqual(report.ready?.sort(), ['local0', 'shared0']);
    // Killed without warning: only what the guest acknowledged must survive.
    await vm.kill();
    acked = (await waitForAcks([reportLogOf(spec)], ['local0', 'shared0'], { atLeast: 50, timeoutMs: 1000 })).acks;
  } finally {
    await vm.kill();
    await vm.cleanup();
  }
  const verify = await verifyDisks(disks, dir, { spanMiB: 8 });
  assert.deepEqual(checkVerify(verify, acked), []);
  assert.ok((verify.get('local0')?.intact ?? 0) >= 50);
});

test('verify reports a record overwritten behind the guest as corrupt', async () => {
  // Record 1 sits in slot 0; overwrite half of it with a pattern.
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 2048 2048', join(dir, 'local.qcow2')], { stdio: 'ignore' });
  const verify = await verifyDisks(disks, dir, { spanMiB: 8 });
  const local = verify.get('local0');
  assert.ok(local && local.corrupt >= 1, `expected a corrupt record, got ${JSON.stringify(local)}`);
  assert.deepEqual(verify.get('shared0')?.corrupt, 0);
  assert.notDeepEqual(checkVerify(verify, new Map([['local0', 1]])), []);
});

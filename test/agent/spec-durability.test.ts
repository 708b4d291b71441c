// A destination agent that adopted a migrated VM must have its spec on disk
// before it answers: right after, the source deletes its disks, and a host
// that loses power with the spec only in the page cache comes back with
// images nobody owns (issue 13, problem 2). The test watches the syscalls the
// real VmRegistry makes: the spec's data, its rename and every directory
// entry down from the data directory are fsynced before adoptMigrated resolves.
import assert from 'node:assert/strict';
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import pino from 'pino';
import { RequestGuard } from '../../src/agent/request-guard.ts';
import { VmRegistry } from '../../src/agent/vm-registry.ts';
import { test } from 'node:test';
import { syncedPath, traceScript, type Syscall } from '../support/strace.ts';
import { makeTempDir } from '../support/temp.ts';

/** The two paths of a rename/renameat/renameat2 as strace prints them. */
function renamePaths(call: Syscall): [string, string] | undefined {
  const quoted = [...call.args.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1] as string);
  return quoted.length === 2 ? [quoted[0] as string, quoted[1] as string] : undefined;
}

test('adoptMigrated returns only once its images, the spec, and every directory entry down to them are fsynced', async (t) => {
  const dir = await makeTempDir('adopt-sync');
  t.after(() => dir.remove());
  const dataDir = join(dir.path, 'data');
  const vmDir = join(dataDir, 'vms', 'web');
  const calls = await traceScript(join(import.meta.dirname, 'scripts/adopt-migrated.ts'), [dataDir, 'web'], ['fsync', 'fdatasync', 'rename', 'renameat', 'renameat2', 'mkdir', 'mkdirat', 'write']);
  const marker = (text: string): number => calls.findIndex((c) => c.name === 'write' && c.args.startsWith('1<') && c.args.includes(`"${text}\\n"`));
  const adopting = marker('adopting');
  const adopted = marker('adopted');
  assert.ok(adopting >= 0 && adopted > adopting, 'the script ran to the end');
  const before = calls.slice(0, adopted).map((call, index) => ({ call, index })).filter(({ index }) => index > adopting);
  const syncs = before.filter(({ call }) => (call.name === 'fsync' || call.name === 'fdatasync') && call.result === '0');
  const syncedAt = (path: string): number[] => syncs.filter(({ call }) => syncedPath(call) === path).map(({ index }) => index);

  const rename = before.find(({ call }) => call.name.startsWith('rename') && renamePaths(call)?.[1] === join(vmDir, 'spec.json'));
  assert.ok(rename, 'spec.json is put in place by a rename, so a crash never leaves half a spec');
  const [temp] = renamePaths(rename.call) as [string, string];
  assert.ok(syncedAt(temp).some((i) => i < rename.index), `the spec's data (${temp}) is fsynced before the rename`);
  assert.ok(syncedAt(vmDir).some((i) => i > rename.index), 'vms/web/ is fsynced after the rename: the new spec.json entry is durable');
  const made = before.find(({ call }) => call.name.startsWith('mkdir') && call.args.includes(`"${vmDir}"`));
  assert.ok(made, 'vms/web/ was created by adoptMigrated');
  assert.ok(syncedAt(join(dataDir, 'vms')).some((i) => i > made.index), 'vms/ is fsynced after vms/web/ was made: the VM directory entry is durable');
  assert.ok(syncedAt(dataDir).length > 0, 'the data directory is fsynced: the vms/ entry is durable');
  assert.ok(syncedAt(join(dataDir, 'pool', 'web-root.qcow2')).length > 0, "the image's data is fsynced");
  assert.ok(syncedAt(join(dataDir, 'pool')).length > 0, "the pool is fsynced: the image's entry is durable");
});

test('a VM directory leaves in one durable rename: killed at any point, the agent finds the whole VM or none of it', async (t) => {
  const dir = await makeTempDir('forget-sync');
  t.after(() => dir.remove());
  const dataDir = join(dir.path, 'data');
  const vmDir = join(dataDir, 'vms', 'web');
  const calls = await traceScript(join(import.meta.dirname, 'scripts/forget-migrated.ts'), [dataDir, 'web'], ['fsync', 'rename', 'renameat', 'renameat2', 'unlink', 'unlinkat', 'rmdir', 'write']);
  const marker = (text: string): number => calls.findIndex((c) => c.name === 'write' && c.args.startsWith('1<') && c.args.includes(`"${text}\\n"`));
  const [forgetting, forgotten] = [marker('forgetting'), marker('forgotten')];
  assert.ok(forgetting >= 0 && forgotten > forgetting, 'the script ran to the end');
  const during = calls.slice(forgetting + 1, forgotten).map((call, index) => ({ call, index }));
  // Before the rename, nothing inside the directory may go: a spec left without its migration record is a VM again.
  const first = during.find(({ call }) => call.name !== 'write' && call.name !== 'fsync' && call.args.includes(vmDir));
  assert.ok(first, 'forgetMigrated touched the VM directory');
  assert.ok(first.call.name.startsWith('rename') && renamePaths(first.call)?.[0] === vmDir, `the first change to ${vmDir} is its rename out of vms/, not ${first.call.name}(${first.call.args})`);
  const [, doomed] = renamePaths(first.call) as [string, string];
  assert.ok(!doomed.startsWith(join(dataDir, 'vms') + '/'), `the directory leaves vms/ (to ${doomed})`);
  const syncs = during.filter(({ call }) => call.name === 'fsync' && call.result === '0');
  assert.ok(syncs.some(({ call, index }) => index > first.index && syncedPath(call) === join(dataDir, 'vms')), 'vms/ is fsynced after the rename: the VM is durably gone');

  // Killed right after the rename: the next agent finishes the removal and lists no VM.
  const trash = join(dataDir, 'trash', 'web.killed');
  await mkdir(trash, { recursive: true });
  await writeFile(join(trash, 'spec.json'), '{"name":"web"}');
  const registry = new VmRegistry('A', dataDir, pino({ level: 'silent' }), { accelerator: 'tcg', reason: 'test' }, await RequestGuard.create({ trustedDirs: [], poolDir: join(dataDir, 'pool'), vmsDir: join(dataDir, 'vms'), storageNbd: undefined }));
  await registry.init();
  assert.deepEqual(registry.names(), []);
  assert.deepEqual(await readdir(join(dataDir, 'trash')), [], 'what a killed agent was removing is removed at the next start');
});

// The simulated power loss of test/support/power-loss/: real node processes
// run with the preload, are killed with SIGKILL, and dropUnsynced must leave
// what a power loss could: only what was fsynced, file and directory.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { after, test } from 'node:test';
import { makeTempDir } from '../temp.ts';
import { dropUnsynced, powerLossEnv } from './index.ts';

const temp = await makeTempDir('powerloss');
after(() => temp.remove());
let cases = 0;

interface Host {
  root: string;
  journal: string;
  /** Runs `body` (ESM, with the helpers below in scope) in a preloaded node process, then kills it with SIGKILL. */
  runThenKill(body: string): Promise<void>;
  powerLoss(): ReturnType<typeof dropUnsynced>;
}

const prelude = `
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { mkdir, open, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
const at = (p) => join(process.env.VMFERRY_POWERLOSS_ROOT, p);
async function fsyncPath(p) { const h = await open(at(p), 'r'); await h.sync(); await h.close(); }
async function writeSynced(p, data) { const h = await open(at(p), 'w'); await h.writeFile(data); await h.sync(); await h.close(); }
`;

async function host(): Promise<Host> {
  const dir = join(temp.path, `case-${++cases}`);
  const root = join(dir, 'data');
  const journal = join(dir, 'powerloss.journal');
  await mkdir(root, { recursive: true });
  const env = { ...process.env, ...powerLossEnv({ journal, root }) };
  return {
    root,
    journal,
    powerLoss: () => dropUnsynced(journal, root),
    runThenKill: (body) =>
      new Promise((resolvePromise, reject) => {
        const script = `${prelude}\n${body}\nprocess.stdout.write('ready\\n');\nsetInterval(() => {}, 60_000);`;
        const child = spawn(process.execPath, ['--input-type=module', '-e', script], { env, stdio: ['ignore', 'pipe', 'pipe'] });
        let stderr = '';
        child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        child.stdout.on('data', (chunk: Buffer) => {
          if (chunk.toString().includes('ready')) child.kill('SIGKILL');
        });
        child.on('exit', (code, signal) => {
          if (signal === 'SIGKILL') resolvePromise();
          else reject(new Error(`the preloaded process exited with ${code} before it was killed: ${stderr}`));
        });
      }),
  };
}

const read = (path: string) => readFileSync(path, 'utf8');

test('a file written without fsync is gone after the power loss, and an old file written over is back to its content', async () => {
  const h = await host();
  await writeFile(join(h.root, 'old.txt'), 'durable');
  await h.runThenKill(`
    await writeFile(at('new.txt'), 'never synced');
    await writeFile(at('old.txt'), 'overwritten, never synced');
  `);
  assert.equal(read(join(h.root, 'new.txt')), 'never synced', 'the page cache survived the kill -9');

  const report = h.powerLoss();
  assert.equal(existsSync(join(h.root, 'new.txt')), false);
  assert.equal(read(join(h.root, 'old.txt')), 'durable');
  assert.deepEqual(report.changes.map((c) => c.path).sort(), [join(h.root, 'new.txt'), join(h.root, 'old.txt')]);
});

test('a file written to a temporary name, fsynced, renamed and its directory fsynced survives intact', async () => {
  const h = await host();
  await writeFile(join(h.root, 'spec.json'), 'v1');
  await h.runThenKill(`
    await writeSynced('spec.json.tmp', 'v2');
    await rename(at('spec.json.tmp'), at('spec.json'));
    await fsyncPath('.');
  `);
  assert.deepEqual(readdirSync(`${h.journal}.shadow`), [], 'no copy of the replaced spec is kept once the rename is durable');
  const report = h.powerLoss();
  assert.equal(read(join(h.root, 'spec.json')), 'v2');
  assert.equal(existsSync(join(h.root, 'spec.json.tmp')), false);
  assert.deepEqual(report.changes, []);
});

test('a rename not followed by an fsync of the directory is undone: the old name and content come back', async () => {
  const h = await host();
  await writeFile(join(h.root, 'spec.json'), 'v1');
  await writeFile(join(h.root, 'a'), 'moved');
  await h.runThenKill(`
    await writeSynced('spec.json.tmp', 'v2');
    await rename(at('spec.json.tmp'), at('spec.json'));
    await rename(at('a'), at('b'));
  `);
  assert.equal(read(join(h.root, 'spec.json')), 'v2');
  h.powerLoss();
  assert.equal(read(join(h.root, 'spec.json')), 'v1');
  assert.equal(existsSync(join(h.root, 'spec.json.tmp')), false, 'the temporary name was created after the directory was last synced');
  assert.equal(read(join(h.root, 'a')), 'moved');
  assert.equal(existsSync(join(h.root, 'b')), false);
});

test('an unlink is undone unless its directory was fsynced', async () => {
  const h = await host();
  await mkdir(join(h.root, 'synced'));
  await writeFile(join(h.root, 'image.qcow2'), 'guest data');
  await writeFile(join(h.root, 'synced', 'image.qcow2'), 'guest data');
  await h.runThenKill(`
    await rm(at('image.qcow2'), { force: true });
    await rm(at('synced/image.qcow2'), { force: true });
    await fsyncPath('synced');
  `);
  h.powerLoss();
  assert.equal(read(join(h.root, 'image.qcow2')), 'guest data');
  assert.equal(existsSync(join(h.root, 'synced', 'image.qcow2')), false);
});

test('an agent restarted after a kill -9 carries on the journal: the restarted process cannot make the first one durable', async () => {
  const h = await host();
  await h.runThenKill(`
    await mkdir(at('vms'));
    await fsyncPath('.');
    await writeSynced('vms/state', 'first, synced');
    await fsyncPath('vms');
    await writeFile(at('vms/state'), 'first, unsynced');
  `);
  await h.runThenKill(`await writeFile(at('vms/state'), 'second, unsynced');`);
  h.powerLoss();
  assert.equal(read(join(h.root, 'vms', 'state')), 'first, synced');
  assert.equal(read(h.journal), '', 'the journal starts again from a durable state');
});

// The local pool: a directory the agent makes, images that qemu-img writes
// into it (no journal sees those), kept once the agent fsynced the directory.
test("a new directory whose parent was not fsynced keeps another program's files once it was fsynced itself, and loses them otherwise", async () => {
  const h = await host();
  await h.runThenKill(`
    for (const dir of ['pool', 'unsynced-pool']) {
      await mkdir(at(dir));
      execFileSync('sh', ['-c', 'echo image > "$0"', at(dir + '/web-root.qcow2')]);
    }
    await fsyncPath('pool/web-root.qcow2');
    await fsyncPath('pool');
  `);
  const report = h.powerLoss();
  assert.equal(read(join(h.root, 'pool', 'web-root.qcow2')), 'image\n');
  assert.equal(existsSync(join(h.root, 'unsynced-pool')), false);
  assert.deepEqual(report.changes.map((c) => c.path), [join(h.root, 'unsynced-pool')]);
});

// VmRegistry#persist's way of writing a VM's spec (issue 13, problem 2): the
// agent restarts without the spec and takes the VM for an interrupted
// incoming migration. The same spec written durably survives.
test("a spec written as VmRegistry#persist does (mkdir, writeFile, rename, no fsync) is lost; written durably it survives", async () => {
  const persistToday = `
    const dir = at('vms/web');
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'spec.json.tmp'), JSON.stringify({ name: 'web' }));
    await rename(join(dir, 'spec.json.tmp'), join(dir, 'spec.json'));
  `;
  const persistDurably = `
    const dir = at('vms/web');
    await mkdir(dir, { recursive: true });
    await fsyncPath('vms');
    await fsyncPath('.');
    await writeSynced('vms/web/spec.json.tmp', JSON.stringify({ name: 'web' }));
    await rename(join(dir, 'spec.json.tmp'), join(dir, 'spec.json'));
    await fsyncPath('vms/web');
  `;
  const today = await host();
  await today.runThenKill(persistToday);
  assert.deepEqual(JSON.parse(read(join(today.root, 'vms', 'web', 'spec.json'))), { name: 'web' }, 'before the power loss');
  const report = today.powerLoss();
  assert.equal(existsSync(join(today.root, 'vms', 'web', 'spec.json')), false);
  assert.ok(report.changes.length > 0);

  const durable = await host();
  await durable.runThenKill(persistDurably);
  durable.powerLoss();
  assert.deepEqual(JSON.parse(read(join(durable.root, 'vms', 'web', 'spec.json'))), { name: 'web' });
});

test('a change through an fs function the preload does not model is kept and reported as a warning', async () => {
  const h = await host();
  await h.runThenKill(`writeFileSync(at('sync.txt'), 'written with writeFileSync');`);
  const report = h.powerLoss();
  assert.equal(read(join(h.root, 'sync.txt')), 'written with writeFileSync');
  assert.deepEqual(report.warnings, ['fs.writeFileSync on sync.txt is not modelled: its effect counts as durable']);
});

test('vmferry\'s own command line runs with the preload from powerLossEnv', async () => {
  const h = await host();
  const cli = resolve(import.meta.dirname, '../../../bin/vmferry.js');
  await new Promise<void>((resolvePromise, reject) => {
    const child = spawn(process.execPath, [cli, '--help'], { env: { ...process.env, ...powerLossEnv({ journal: h.journal, root: h.root }) }, stdio: 'ignore' });
    child.on('exit', (code) => (code === 0 ? resolvePromise() : reject(new Error(`vmferry --help exited with ${code}`))));
  });
  assert.match(await readFile(h.journal, 'utf8'), /"op":"start"/);
});

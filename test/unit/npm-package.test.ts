// `npm pack`'s tarball is what `npm install -g` installs: unpacked on its own, without the sources, with
// only the production dependencies beside it, its vmferry answers --version and --help without loading
// tsx or any TypeScript file, and its controller serves the dashboard's page from the package.
//
// The dependencies are this checkout's own, linked from node_modules: exactly the packages
// package-lock.json does not mark dev, so tsx and typescript are absent as on an installed machine.
// A real `npm install -g` of the tarball fetches the dependencies from the registry and compiles
// better-sqlite3 (minutes; README, "Installing"), too slow and too networked for npm test.
import assert from 'node:assert/strict';
import { execFile as execFileCallback, spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, symlink, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { findFreePort } from '../../src/util/ports.ts';
import { pollUntil } from '../../src/util/poll.ts';
import { makeTempDir } from '../support/temp.ts';

const execFile = promisify(execFileCallback);
const repo = join(import.meta.dirname, '../..');

/** A module hook that writes every module URL a process resolves to the file named by VMFERRY_MODULE_LOG. */
const moduleLogHooks = `import { appendFileSync } from 'node:fs';
export async function resolve(specifier, context, next) {
  const resolved = await next(specifier, context);
  appendFileSync(process.env.VMFERRY_MODULE_LOG, resolved.url + '\\n');
  return resolved;
}
`;

/** Links the lock file's production packages (top level; nested ones come inside them) from this checkout. */
async function linkProductionDependencies(packageDir: string): Promise<string[]> {
  const lock = JSON.parse(await readFile(join(repo, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean; devOptional?: boolean }> };
  const names = Object.entries(lock.packages)
    .filter(([path, entry]) => /^node_modules\/(@[^/]+\/)?[^/]+$/.test(path) && !entry.dev && !entry.devOptional)
    .map(([path]) => path.slice('node_modules/'.length))
    .filter((name) => existsSync(join(repo, 'node_modules', name)));
  for (const name of names) {
    await mkdir(join(packageDir, 'node_modules', name, '..'), { recursive: true });
    await symlink(join(repo, 'node_modules', name), join(packageDir, 'node_modules', name));
  }
  return names;
}

async function listFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  return entries.filter((entry) => entry.isFile()).map((entry) => relative(dir, join(entry.parentPath, entry.name)));
}

test('the npm package runs without its sources and without tsx, and its controller serves the dashboard', async (t) => {
  const work = await makeTempDir('npm-package');
  try {
    // npm pack runs the prepack script (scripts/build.js): the tarball holds a build of these sources.
    const { stdout } = await execFile('npm', ['pack', '--json', '--pack-destination', work.path], { cwd: repo, timeout: 300_000 });
    const tarball = join(work.path, (JSON.parse(stdout) as { filename: string }[])[0]!.filename);
    await execFile('tar', ['-xzf', tarball, '-C', work.path]);
    const pkg = join(work.path, 'package');

    const files = await listFiles(pkg);
    assert.deepEqual(files.filter((file) => file.endsWith('.ts') || file.startsWith('src/') || file.startsWith('test/')), [], 'no sources, no tests');
    for (const file of ['bin/vmferry.js', 'dist/cli/main.js', 'dist/controller/dashboard-web/index.html', 'dist/controller/dashboard-web/app.js', 'dist/storage/native/fshelper.c', 'contrib/systemd/vmferry-agent.service']) {
      assert.ok(files.includes(file), `${file} is in the package`);
    }
    const linked = await linkProductionDependencies(pkg);
    assert.ok(!linked.includes('tsx') && !linked.includes('typescript'), 'tsx and typescript are development dependencies');

    const hooks = join(work.path, 'module-log-hooks.mjs');
    await writeFile(hooks, moduleLogHooks);
    const register = join(work.path, 'module-log.mjs');
    await writeFile(register, `import { register } from 'node:module';\nregister(${JSON.stringify(`file://${hooks}`)});\n`);
    const moduleLog = join(work.path, 'modules.log');
    const cli = join(pkg, 'bin/vmferry.js');
    const version = (JSON.parse(await readFile(join(repo, 'package.json'), 'utf8')) as { version: string }).version;

    const started = performance.now();
    const help = await execFile(process.execPath, [cli, '--help']);
    t.diagnostic(`vmferry --help from the package: ${Math.round(performance.now() - started)} ms`);
    assert.match(help.stdout, /Usage: vmferry/);
    const logged = await execFile(process.execPath, ['--import', register, cli, '--version'], { env: { ...process.env, VMFERRY_MODULE_LOG: moduleLog } });
    assert.equal(logged.stdout, `${version}\n`);
    const modules = (await readFile(moduleLog, 'utf8')).trim().split('\n');
    assert.ok(modules.includes(`file://${join(pkg, 'dist/cli/main.js')}`), 'the compiled CLI ran');
    assert.deepEqual(modules.filter((url) => url.includes('/tsx/') || url.endsWith('.ts')), [], 'no tsx, no TypeScript');

    // The controller reads its page from beside its compiled code, and opens its SQLite store (a native module).
    const port = await findFreePort('127.0.0.1');
    const controller = spawn(process.execPath, [cli, 'controller', '--listen', `127.0.0.1:${port}`, '--db', join(work.path, 'controller.db'), '--insecure'], { stdio: 'ignore' });
    try {
      const page = await pollUntil(() => fetch(`http://127.0.0.1:${port}/ui/`).then((r) => (r.ok ? r.text() : undefined), () => undefined), {
        timeoutMs: 30_000,
        intervalMs: 200,
        timeoutMessage: 'the packaged controller did not serve /ui/ within 30 s',
      });
      assert.equal(page, await readFile(join(repo, 'src/controller/dashboard-web/index.html'), 'utf8'));
      const script = await fetch(`http://127.0.0.1:${port}/ui/app.js`);
      assert.equal(await script.text(), await readFile(join(repo, 'src/controller/dashboard-web/app.js'), 'utf8'));
    } finally {
      controller.kill('SIGTERM');
      if (controller.exitCode === null) await once(controller, 'exit');
    }
  } finally {
    await work.remove();
  }
});

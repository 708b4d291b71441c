// bin/vmferry.js runs the compiled dist/ only while it is as new as src/: in a small checkout of its own
// (the real bin/vmferry.js, scripts/build.js and tsconfig.build.json, two modules and a page), a build
// makes the command run dist/, an edit makes it run the sources until the next build, and a removed
// source's module leaves dist/ with the next build. Tests spawn the CLI and the daemons through bin/vmferry.js: this is
// what keeps them from running code older than the sources.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { copyFile, mkdir, readFile, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { makeTempDir } from '../support/temp.ts';

const execFile = promisify(execFileCallback);
const repo = join(import.meta.dirname, '../..');

/** The checkout's main module says which file ran (main.ts or main.js) and what the module it imports holds. */
const main = "import { words } from './words.ts';\nimport { basename } from 'node:path';\nconsole.log(`${basename(import.meta.filename)} ${words}`);\n";

async function put(root: string, path: string, text: string): Promise<void> {
  await mkdir(dirname(join(root, path)), { recursive: true });
  await writeFile(join(root, path), text);
}

/** Dates a file ten seconds back, as if written that long ago. */
async function backdate(path: string): Promise<void> {
  const past = new Date(Date.now() - 10_000);
  await utimes(path, past, past);
}

test('a checkout runs dist/ while it is as new as src/, the sources after an edit, dist/ again after the next build', async () => {
  const work = await makeTempDir('dist-build');
  try {
    const root = work.path;
    for (const file of ['bin/vmferry.js', 'scripts/build.js', 'scripts/dist-freshness.js', 'tsconfig.build.json']) {
      await mkdir(dirname(join(root, file)), { recursive: true });
      await copyFile(join(repo, file), join(root, file));
    }
    await symlink(join(repo, 'node_modules'), join(root, 'node_modules'));
    await put(root, 'package.json', '{ "type": "module" }\n');
    // The settings the build's own extend, less the type checking and most of the library types (the lint's job, and seconds per build here).
    const settings = JSON.parse(await readFile(join(repo, 'tsconfig.json'), 'utf8')) as { compilerOptions: Record<string, unknown> };
    await put(root, 'tsconfig.json', JSON.stringify({ ...settings, compilerOptions: { ...settings.compilerOptions, noCheck: true, lib: ['ES5'], types: [] } }));
    await put(root, 'src/cli/main.ts', main);
    await put(root, 'src/cli/words.ts', "export const words = 'first';\n");
    await put(root, 'src/controller/dashboard-web/index.html', '<!doctype html>\n');
    const build = () => execFile(process.execPath, [join(root, 'scripts/build.js')]);
    const run = async () => (await execFile(process.execPath, [join(root, 'bin/vmferry.js')])).stdout.trim();

    assert.equal(await run(), 'main.ts first', 'no dist/ yet: the sources run');
    await build();
    assert.equal(await run(), 'main.js first');
    assert.match(await readFile(join(root, 'dist/cli/main.js'), 'utf8'), /from ["']\.\/words\.js["']/, 'the .ts import is rewritten');
    assert.equal(await readFile(join(root, 'dist/controller/dashboard-web/index.html'), 'utf8'), '<!doctype html>\n', 'files beside the code are copied');
    assert.deepEqual(await build(), { stdout: '', stderr: '' }, 'nothing changed: the build does nothing and says nothing');

    // A build a while ago (its stamp dated back), then an edit: words.ts replaced by more.ts.
    await backdate(join(root, 'dist/.built'));
    await rm(join(root, 'src/cli/words.ts'));
    await put(root, 'src/cli/more.ts', "export const words = 'second';\n");
    await put(root, 'src/cli/main.ts', main.replace('./words.ts', './more.ts'));
    assert.equal(await run(), 'main.ts second', 'edited sources: they run, not the older dist/');
    await build();
    assert.equal(await run(), 'main.js second');
    assert.equal(existsSync(join(root, 'dist/cli/words.js')), false, 'the removed source\'s module is gone from dist/');
  } finally {
    await work.remove();
  }
});

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';
import { runVmferry } from '../support/cli.ts';

const packageVersion = (JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

test('vmferry --version prints the package version and exits 0; --help names it too', async () => {
  // The controller URL runVmferry passes is never contacted: --version answers before any command runs.
  const version = await runVmferry('http://127.0.0.1:9', ['--version']);
  assert.equal(version.code, 0, version.stderr);
  assert.equal(version.stdout, `${packageVersion}\n`);
  const help = await runVmferry('http://127.0.0.1:9', ['--help']);
  assert.equal(help.code, 0, help.stderr);
  assert.match(help.stdout, new RegExp(`vmferry ${packageVersion.replace(/\./g, '\\.')}\\)`));
  assert.match(help.stdout, /-V, --version/);
});

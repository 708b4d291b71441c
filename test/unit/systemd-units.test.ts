// The systemd units in contrib/systemd: systemd accepts each as written, and
// each one's ExecStart runs its daemon with only options the CLI has (taken
// from the CLI's own --help, so a renamed option fails here, not on a host).
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { runVmferry } from '../support/cli.ts';
import { contribSystemd as contrib, environmentFile, execStartWords, installedCli, serviceSettings, serviceUnits as units } from '../support/systemd-unit.ts';

const execFile = promisify(execFileCallback);
const root = join(import.meta.dirname, '../..');

/** The options a --help lists: name → whether it takes a value. */
function helpOptions(help: string): Map<string, boolean> {
  const options = new Map<string, boolean>();
  // Two spaces in: a wrapped description (", the\n    --listen host)") is indented further.
  for (const match of help.matchAll(/^ {2}(?:-\w, )?(--[a-z][a-z-]*)( <[^>]+>| \[[^\]]+\])?/gm)) options.set(match[1] as string, match[2] !== undefined);
  return options;
}

async function help(args: string[]): Promise<Map<string, boolean>> {
  const result = await runVmferry('http://127.0.0.1:9', [...args, '--help']);
  assert.equal(result.code, 0, result.stderr);
  return helpOptions(result.stdout);
}

const globalOptions = help([]);

for (const { unit, env, command } of units) {
  test(`${unit}: its ExecStart runs \`vmferry ${command.join(' ')}\` with only options the CLI accepts, each with its value`, async () => {
    const text = await readFile(join(contrib, unit), 'utf8');
    assert.deepEqual(serviceSettings(text).get('Restart'), ['on-failure']);
    const words = execStartWords(text, environmentFile(await readFile(join(contrib, env), 'utf8')));
    assert.equal(words[0], installedCli);
    const options = new Map([...(await globalOptions), ...(await help([...command]))]);
    assert.ok(options.has('--listen') || options.has('--admin'), 'the daemon\'s --help was read');
    const positional: string[] = [];
    for (let i = 1; i < words.length; i++) {
      const word = words[i] as string;
      if (!word.startsWith('-')) {
        positional.push(word);
        continue;
      }
      assert.ok(options.has(word), `${unit}: vmferry ${command.join(' ')} has no option ${word}`);
      if (options.get(word)) {
        const value = words[i + 1];
        assert.ok(value !== undefined && !value.startsWith('--'), `${unit}: ${word} needs a value`);
        i++;
      }
    }
    assert.deepEqual(positional, [...command], `${unit} runs vmferry ${command.join(' ')}`);
  });
}

test('the agent\'s unit leaves its guests running when it stops (KillMode=process), keeps /dev/kvm, and the daemons without QEMU hold no capabilities', async () => {
  const agent = serviceSettings(await readFile(join(contrib, 'vmferry-agent.service'), 'utf8'));
  assert.deepEqual(agent.get('KillMode'), ['process']);
  for (const closesDevices of ['PrivateDevices', 'DeviceAllow', 'DevicePolicy', 'ProtectClock', 'CapabilityBoundingSet']) assert.equal(agent.get(closesDevices), undefined, closesDevices);
  for (const unit of ['vmferry-storage.service', 'vmferry-controller.service']) {
    assert.deepEqual(serviceSettings(await readFile(join(contrib, unit), 'utf8')).get('CapabilityBoundingSet'), [''], unit);
  }
});

test('systemd-analyze verify accepts every unit, with no warning', async () => {
  // systemd-analyze checks that ExecStart's program and the EnvironmentFile exist: a copy points at this checkout's.
  const dir = await mkdtemp(join(tmpdir(), 'vmferry-units-'));
  try {
    const copies: string[] = [];
    for (const { unit, env } of units) {
      const text = (await readFile(join(contrib, unit), 'utf8')).replaceAll(installedCli, join(root, 'bin/vmferry.js')).replace(/^EnvironmentFile=.*$/m, `EnvironmentFile=${join(contrib, env)}`);
      await writeFile(join(dir, unit), text);
      copies.push(join(dir, unit));
    }
    const { stdout, stderr } = await execFile('systemd-analyze', ['verify', '--man=no', ...copies]);
    // Unknown keys and bad values are only warnings (exit 0): any output fails.
    assert.equal(stdout + stderr, '');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

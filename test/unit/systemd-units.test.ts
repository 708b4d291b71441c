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

const execFile = promisify(execFileCallback);
const root = join(import.meta.dirname, '../..');
const contrib = join(root, 'contrib/systemd');
const installedCli = '/opt/vmferry/bin/vmferry.js';

const units = [
  { unit: 'vmferry-storage.service', env: 'storage.env.example', command: ['storage', 'serve'] },
  { unit: 'vmferry-controller.service', env: 'controller.env.example', command: ['controller'] },
  { unit: 'vmferry-agent.service', env: 'agent.env.example', command: ['agent'] },
] as const;

/** A unit file's [Service] settings: key → every value it is given, in order. */
function serviceSettings(text: string): Map<string, string[]> {
  const settings = new Map<string, string[]>();
  let section = '';
  for (const line of text.replace(/\\\n/g, ' ').split('\n').map((l) => l.trim())) {
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = header[1] as string;
      continue;
    }
    const eq = line.indexOf('=');
    if (section !== 'Service' || eq < 0) continue;
    const key = line.slice(0, eq);
    settings.set(key, [...(settings.get(key) ?? []), line.slice(eq + 1)]);
  }
  return settings;
}

/** An environment file's variables (plain KEY=value lines, as the examples are written). */
function environment(text: string): Record<string, string> {
  return Object.fromEntries(text.split('\n').filter((l) => /^[A-Z_]+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

/** ExecStart's words as systemd makes them: ${VAR} replaced inside a word, a lone $VAR split into words. */
function expand(execStart: string, env: Record<string, string>): string[] {
  return execStart.split(/\s+/).flatMap((word) => {
    const lone = /^\$([A-Z_]+)$/.exec(word);
    if (lone) return (env[lone[1] as string] ?? '').split(/\s+/).filter(Boolean);
    return [word.replace(/\$\{([A-Z_]+)\}/g, (_match, name: string) => {
      assert.ok(name in env, `\${${name}} is set in the example environment file`);
      return env[name] as string;
    })];
  });
}

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
    const settings = serviceSettings(await readFile(join(contrib, unit), 'utf8'));
    assert.deepEqual(settings.get('Restart'), ['on-failure']);
    const execStart = settings.get('ExecStart');
    assert.equal(execStart?.length, 1, 'one ExecStart');
    const words = expand(execStart?.[0] as string, environment(await readFile(join(contrib, env), 'utf8')));
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

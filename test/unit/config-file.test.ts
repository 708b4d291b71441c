// A daemon's options from a YAML file (--config): a storage server starts from one, an option on the
// command line wins over it; an unknown key, a list where one value goes, bad YAML, a missing file and a
// missing required option are each refused with an error naming the key and the file.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { findFreePort } from '../../src/util/ports.ts';
import { runVmferry } from '../support/cli.ts';
import { makeTempDir } from '../support/temp.ts';

const cli = join(import.meta.dirname, '../../bin/vmferry.js');

async function healthy(url: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await fetch(url).then((r) => r.ok, () => false)) return true;
    await sleep(200);
  }
  return false;
}

test('vmferry storage serve takes its options from --config; an option on the command line wins', async () => {
  const work = await makeTempDir('config-file');
  try {
    const [nbdPort, filePort, flagPort] = await Promise.all([findFreePort('127.0.0.1'), findFreePort('127.0.0.1'), findFreePort('127.0.0.1')]);
    const config = join(work.path, 'storage.yaml');
    await writeFile(config, [`data-dir: ${join(work.path, 'data')}`, `listen: 127.0.0.1:${nbdPort}`, `admin: 127.0.0.1:${filePort}`, 'insecure: true', 'memory-budget-mib: 64', ''].join('\n'));
    const server = spawn(process.execPath, [cli, 'storage', 'serve', '--config', config, '--admin', `127.0.0.1:${flagPort}`], { stdio: 'ignore' });
    try {
      assert.ok(await healthy(`http://127.0.0.1:${flagPort}/healthz`, 30_000), 'the admin API listens where the command line said');
      assert.equal(await fetch(`http://127.0.0.1:${filePort}/healthz`).then(() => true, () => false), false, 'not where the file said');
    } finally {
      server.kill('SIGTERM');
      await once(server, 'exit');
    }
  } finally {
    await work.remove();
  }
});

test('a config file with an unknown key, a wrong value, bad YAML, or none where named is refused, naming the key and the file', async () => {
  const work = await makeTempDir('config-file');
  try {
    const file = async (name: string, text: string): Promise<string> => {
      const path = join(work.path, name);
      await writeFile(path, text);
      return path;
    };
    const typo = await file('typo.yaml', 'host-id: A\nlisten: 127.0.0.1:1\ndata-dir: /tmp/x\ntrusted-dirs: [/srv]\n');
    let result = await runVmferry('http://127.0.0.1:9', ['agent', '--config', typo]);
    assert.equal(result.code, 1);
    assert.match(result.stderr, new RegExp(`unknown key "trusted-dirs" in ${typo}: vmferry agent takes .*trusted-dir`));

    const list = await file('list.yaml', 'listen: [127.0.0.1:1, 127.0.0.1:2]\n');
    result = await runVmferry('http://127.0.0.1:9', ['controller', '--config', list]);
    assert.match(result.stderr, new RegExp(`key "listen" in ${list} must be a single value`));

    const bad = await file('bad.yaml', 'listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n');
    result = await runVmferry('http://127.0.0.1:9', ['controller', '--config', bad]);
    assert.match(result.stderr, new RegExp(`${bad} is not valid YAML: .*unique`));

    const switchValue = await file('switch.yaml', 'insecure: "yes"\n');
    result = await runVmferry('http://127.0.0.1:9', ['controller', '--config', switchValue]);
    assert.match(result.stderr, /key "insecure" in .* is a switch: true or false/);

    result = await runVmferry('http://127.0.0.1:9', ['storage', 'serve', '--config', join(work.path, 'absent.yaml')]);
    assert.match(result.stderr, /cannot read the config file .*absent\.yaml/);

    const partial = await file('partial.yaml', 'listen: 127.0.0.1:1\n');
    result = await runVmferry('http://127.0.0.1:9', ['controller', '--config', partial], 20_000);
    assert.match(result.stderr, new RegExp(`vmferry controller needs --db: give it on the command line, or as "db:" in ${partial}`));
  } finally {
    await work.remove();
  }
});

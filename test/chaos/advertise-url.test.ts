// `vmferry agent --advertise-url`: the controller learns the URL given there
// (a proxy in front of the agent, say) from the heartbeat, not the listen
// address; a URL the controller could not use is refused at start.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { resolve } from 'node:path';
import { test } from 'node:test';
import { findFreePort } from '../../src/util/ports.ts';
import { makeTempDir } from '../support/temp.ts';

const cli = resolve(import.meta.dirname, '../../bin/vmferry.js');

test('the agent heartbeats the --advertise-url to the controller, its own address for migration traffic, and its accelerator', async () => {
  const work = await makeTempDir('advertise');
  const beats: Record<string, string>[] = [];
  const controller = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString()));
    req.on('end', () => {
      if (req.url === '/v1/hosts/heartbeat') beats.push(JSON.parse(body) as Record<string, string>);
      res.writeHead(204).end();
    });
  });
  controller.listen(0, '127.0.0.1');
  await once(controller, 'listening');
  const controllerUrl = `http://127.0.0.1:${(controller.address() as AddressInfo).port}`;
  const port = await findFreePort('127.0.0.1');
  const agent = spawn(process.execPath, [cli, '--controller', controllerUrl, 'agent', '--host-id', 'P', '--listen', `127.0.0.1:${port}`, '--data-dir', work.path, '--advertise-url', 'http://127.0.0.9:18801', '--accel', 'tcg', '--insecure'], {
    stdio: 'ignore',
  });
  try {
    for (let i = 0; i < 300 && beats.length === 0; i++) await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(beats[0], {
      id: 'P',
      url: 'http://127.0.0.9:18801',
      address: '127.0.0.1',
      accelerator: 'tcg',
      acceleratorReason: 'chosen with --accel tcg (KVM not probed)',
    });
  } finally {
    if (agent.exitCode === null && agent.signalCode === null) {
      const exited = once(agent, 'exit');
      agent.kill('SIGTERM');
      await exited;
    }
    controller.close();
    await work.remove();
  }
});

test('an --advertise-url that is not an http URL without a path is refused, naming the option', async () => {
  const work = await makeTempDir('advertise-bad');
  try {
    for (const bad of ['proxy:8080', 'ftp://10.0.0.2:21', 'http://10.0.0.2:10801/agent']) {
      const agent = spawn(process.execPath, [cli, '--controller', 'http://127.0.0.1:9', 'agent', '--host-id', 'P', '--listen', '127.0.0.1:0', '--data-dir', work.path, '--advertise-url', bad, '--insecure'], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      agent.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      const [code] = (await once(agent, 'exit')) as [number | null];
      assert.notEqual(code, 0, `${bad} is refused`);
      assert.match(stderr, /--advertise-url must be an? .*URL.*VMF_INVALID_ARGUMENT/s, `${bad}: ${stderr}`);
    }
  } finally {
    await work.remove();
  }
});

// A test cluster's network after a run that was killed (SIGINT during cluster
// start, kill -9 of the campaign): its namespaces still hold processes, so the
// namespaces and their veth pairs live on. The next cluster of the same prefix
// must come up all the same, and the leftover processes must be gone.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';
import { createGuestSegment, createNamespaceNetwork } from '../../src/demo/netns.ts';
import { runProgram } from '../../src/util/run.ts';

/** Tries a TCP connection from inside `namespace`; returns the error code (or "connected"). */
async function connectFrom(namespace: string, address: string): Promise<string> {
  const script = `require('net').connect(9, ${JSON.stringify(address)}).on('connect', () => { console.log('connected'); process.exit(0); }).on('error', (e) => { console.log(e.code); process.exit(0); }).setTimeout(2000, () => { console.log('timeout'); process.exit(0); })`;
  return (await runProgram('ip', ['netns', 'exec', namespace, process.execPath, '-e', script])).trim();
}

test('a network whose earlier copy was left running in its namespaces is built again', { skip: process.getuid?.() !== 0 && 'needs root for network namespaces' }, async () => {
  const prefix = 'vmfl';
  const options = { subnet: '10.213.77', hostLinkSubnet: '10.213.78' };
  const first = await createNamespaceNetwork(prefix, ['A', 'B'], options);
  await createGuestSegment(prefix, first.hosts, { subnet: '10.213.79' });
  // A process that stays in host A's namespace, as an agent of a killed run would.
  const leftover = spawn('ip', ['netns', 'exec', `${prefix}-a`, 'sleep', '300'], { stdio: 'ignore' });
  const exited = once(leftover, 'exit');
  try {
    await runProgram('ip', ['netns', 'exec', `${prefix}-a`, 'true']);
    // The run is "killed": nothing of first.remove() happens.
    const second = await createNamespaceNetwork(prefix, ['A', 'B'], options).catch(async (err: unknown) => {
      await first.remove();
      throw err;
    });
    try {
      const segment = await createGuestSegment(prefix, second.hosts, { subnet: '10.213.79' });
      await segment.remove();
      const [, signal] = (await exited) as [number | null, NodeJS.Signals | null];
      assert.equal(signal, 'SIGKILL', 'the process left in the old namespace is killed');
      // The new network carries traffic: host A reaches host B over the bridge and the direct link.
      for (const address of [second.hosts[1]?.address, second.hosts[1]?.linkAddress]) {
        assert.equal(await connectFrom(`${prefix}-a`, address as string), 'ECONNREFUSED', `host B answers at ${address} (a refused connection is B's reply)`);
      }
    } finally {
      await second.remove();
    }
  } finally {
    leftover.kill('SIGKILL');
  }
  const links = await runProgram('ip', ['-o', 'link']);
  assert.doesNotMatch(links, new RegExp(`${prefix}\\d`), 'no veth of the test network is left');
  assert.doesNotMatch(await runProgram('ip', ['netns', 'list']), new RegExp(`^${prefix}-`, 'm'), 'no namespace is left');
});

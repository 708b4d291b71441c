// An agent's GET /metrics counts its VMs by their QEMU's state, those in a migration and their mirrors
// (test/cluster/service-units.test.ts scrapes a real agent through mutual TLS).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { VmInfo } from '../../src/api/agent-types.ts';
import { renderAgentMetrics } from '../../src/agent/metrics.ts';

const vm = (name: string, state: VmInfo['state'], migrating: boolean, blockJobs: string[]): VmInfo => ({ name, host: 'A', state, pid: null, migrating, blockJobs }) as unknown as VmInfo;

test('an agent\'s /metrics counts its VMs by state, the migrating ones and their mirrors', () => {
  const text = renderAgentMetrics({
    hostId: 'A',
    accelerator: 'kvm',
    vms: [vm('web', 'running', true, ['mirror-root', 'mirror-data']), vm('db', 'running', false, []), vm('old', 'stopped', false, [])],
    poolFreeBytes: 5 * 2 ** 30,
  });
  const sample = (name: string): string | undefined => new RegExp(`^${name.replace(/[{}]/g, '\\$&')} (\\S+)$`, 'm').exec(text)?.[1];
  assert.equal(sample('vmferry_agent_vms{state="running"}'), '2');
  assert.equal(sample('vmferry_agent_vms{state="paused"}'), '0');
  assert.equal(sample('vmferry_agent_vms{state="stopped"}'), '1');
  assert.equal(sample('vmferry_agent_vms_migrating'), '1');
  assert.equal(sample('vmferry_agent_block_jobs'), '2');
  assert.equal(sample('vmferry_agent_pool_free_bytes'), String(5 * 2 ** 30));
  assert.match(text, /^vmferry_agent_build_info\{version="[^"]+",host="A",accelerator="kvm"\} 1$/m);
});

/**
 * GET /metrics of an agent, for Prometheus: its VMs by state, those in a
 * migration and the block jobs (a migration's mirrors) their QEMUs run, and
 * the free space of its pool. Read at each scrape from the registry and the
 * file system, so nothing is counted in memory.
 */
import type { VmInfo } from '../api/agent-types.ts';
import { Exposition } from '../http/prometheus.ts';
import { vmferryVersion } from '../version.ts';

const states: readonly VmInfo['state'][] = ['running', 'paused', 'stopped'];

export interface AgentFigures {
  hostId: string;
  accelerator: string;
  vms: readonly VmInfo[];
  poolFreeBytes: number;
}

export function renderAgentMetrics({ hostId, accelerator, vms, poolFreeBytes }: AgentFigures): string {
  const out = new Exposition();
  out.metric('vmferry_agent_build_info', 'gauge', 'The agent\'s version, host and what runs its guests (always 1).', [[{ version: vmferryVersion, host: hostId, accelerator }, 1]]);
  out.metric('vmferry_agent_vms', 'gauge', 'VMs on this host, by the state of their QEMU.', states.map((state) => [{ state }, vms.filter((vm) => vm.state === state).length]));
  out.metric('vmferry_agent_vms_migrating', 'gauge', 'VMs on this host in a migration, as source or destination.', [[{}, vms.filter((vm) => vm.migrating).length]]);
  out.metric('vmferry_agent_block_jobs', 'gauge', 'Block jobs (a migration\'s disk mirrors) the QEMUs on this host run.', [[{}, vms.reduce((n, vm) => n + vm.blockJobs.length, 0)]]);
  out.metric('vmferry_agent_pool_free_bytes', 'gauge', 'Free space of the local pool\'s file system, for new local disks and incoming mirrors.', [[{}, poolFreeBytes]]);
  return out.text();
}

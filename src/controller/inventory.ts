/**
 * The cluster as the controller knows it: hosts (agents register and
 * heartbeat; a silent one is marked unreachable) and where each VM runs.
 */
import { VmferryError } from '../errors.ts';
import { AgentClient } from '../agent/client.ts';
import type { CreateVmRequest, VmInfo } from '../api/agent-types.ts';
import type { HostRecord, Store } from '../store/store.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import type { EpochStamp } from '../agent/leader-epoch.ts';

/** A host that has not reported for this long is unreachable. */
export const heartbeatTimeoutMs = 15_000;

export interface HostStatus extends HostRecord {
  state: 'reachable' | 'unreachable';
  /** Being drained (`vmferry host drain`): no VM is created on it or migrated to it. */
  draining: boolean;
}

export class Inventory {
  readonly #store: Store;
  readonly #tls: TlsIdentity | undefined;
  readonly #stamp: EpochStamp | undefined;

  /** tls: the controller's identity, presented to every agent; stamp: the leader epoch its requests carry (src/controller/leadership.ts). */
  constructor(store: Store, tls?: TlsIdentity, stamp?: EpochStamp) {
    this.#store = store;
    this.#tls = tls;
    this.#stamp = stamp;
  }

  async heartbeat(host: Omit<HostRecord, 'lastSeen'>): Promise<void> {
    await this.#store.upsertHost({ ...host, lastSeen: Date.now() });
  }

  async hosts(): Promise<HostStatus[]> {
    const now = Date.now();
    const draining = new Set(await this.#store.drainingHosts());
    return (await this.#store.listHosts()).map((host) => ({ ...host, state: now - host.lastSeen <= heartbeatTimeoutMs ? 'reachable' : 'unreachable', draining: draining.has(host.id) }));
  }

  /** Refuses a host that is being drained as the place of a new or migrated VM. */
  async refuseDraining(hostId: string, what: string): Promise<void> {
    if ((await this.#store.drainingHosts()).includes(hostId)) {
      throw new VmferryError('VMF_CONFLICT', `host ${hostId} is draining: ${what} refused (vmferry host undrain ${hostId} ends that)`);
    }
  }

  /** The agent of a host, refusing hosts that are unknown or silent. */
  async agent(hostId: string): Promise<AgentClient> {
    const host = (await this.hosts()).find((h) => h.id === hostId);
    if (!host) throw new VmferryError('VMF_NOT_FOUND', `no host named ${hostId} (known: ${(await this.hosts()).map((h) => h.id).join(', ') || 'none'})`);
    if (host.state === 'unreachable') {
      throw new VmferryError('VMF_UNREACHABLE', `host ${hostId} has not reported for ${Math.round((Date.now() - host.lastSeen) / 1000)} s; its agent at ${host.url} is unreachable`);
    }
    return new AgentClient(host.url, this.#tls, host.id, this.#stamp);
  }

  /** Every VM on every reachable host, as the agents report them now. */
  async vms(): Promise<VmInfo[]> {
    const reachable = (await this.hosts()).filter((h) => h.state === 'reachable');
    const lists = await Promise.all(reachable.map((h) => new AgentClient(h.url, this.#tls, h.id, this.#stamp).listVms().catch(() => [] as VmInfo[])));
    const vms = lists.flat();
    // A source that a migration still holds (paused, or waiting to retire) is not where the VM lives.
    for (const vm of vms.filter((v) => !v.migrating)) await this.#store.setVmLocation({ name: vm.name, hostId: vm.host });
    for (const vm of vms) await this.#withMigration(vm);
    return vms.sort((a, b) => a.name.localeCompare(b.name) || a.host.localeCompare(b.host));
  }

  async #withMigration(vm: VmInfo): Promise<VmInfo> {
    const active = await this.#store.activeMigration(vm.name);
    if (active) vm.migration = { id: active.id, phase: active.phase, ...(active.phase === 'unresolved' && active.report?.error ? { reason: active.report.error.message } : {}) };
    return vm;
  }

  async locateVm(name: string): Promise<string> {
    const known = await this.#store.getVmLocation(name);
    if (known) return known.hostId;
    const found = (await this.vms()).find((vm) => vm.name === name);
    if (!found) throw new VmferryError('VMF_NOT_FOUND', `no VM named ${name} on any reachable host`);
    return found.host;
  }

  async vm(name: string): Promise<VmInfo> {
    return this.#withMigration(await (await this.agent(await this.locateVm(name))).getVm(name));
  }

  async createVm(hostId: string, request: CreateVmRequest): Promise<VmInfo> {
    if (await this.#store.getVmLocation(request.name)) throw new VmferryError('VMF_CONFLICT', `a VM named ${request.name} already exists`);
    await this.refuseDraining(hostId, `creating VM ${request.name} there is`);
    const vm = await (await this.agent(hostId)).createVm(request);
    await this.#store.setVmLocation({ name: vm.name, hostId });
    return vm;
  }

  async deleteVm(name: string): Promise<void> {
    await (await this.agent(await this.locateVm(name))).deleteVm(name);
    await this.#store.deleteVmLocation(name);
  }
}

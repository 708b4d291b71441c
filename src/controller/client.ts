/** The controller's API as the CLI uses it. */
import type { CreateVmRequest, QuarantineEntry, VmInfo } from '../api/agent-types.ts';
import type { HostStatus } from './inventory.ts';
import { hasCode } from '../errors.ts';
// Each request goes to whichever controller leads, when the URL lists several (failover.ts).
import { currentController, passOver, requestController as requestJson } from './failover.ts';
import { readEventStream } from '../http/event-source.ts';
import type { EventSourceMessage } from 'eventsource-parser';
import { importTimeoutMs } from '../storage/disk-images.ts';
import type { MigrationPlan } from '../migration/plan.ts';
import type { MigrationReport } from '../migration/phases.ts';
import type { MigrationRecord, StoredEvent } from '../store/store.ts';
import type { MigrateRequest } from '../api/controller-types.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import type { DrainStatus } from './drain.ts';

const controller = { role: 'controller' } as const;

export class ControllerClient {
  readonly #url: string;
  readonly #tls: TlsIdentity | undefined;

  /** tls: the identity presented to the controller (an operator's, with mutual TLS). */
  constructor(url: string, tls?: TlsIdentity) {
    this.#url = url;
    this.#tls = tls;
  }

  hosts(): Promise<HostStatus[]> {
    return requestJson(this.#url, 'GET', '/v1/hosts', { tls: this.#tls, server: controller });
  }

  quarantine(host: string): Promise<QuarantineEntry[]> {
    return requestJson(this.#url, 'GET', `/v1/hosts/${encodeURIComponent(host)}/quarantine`, { tls: this.#tls, server: controller });
  }

  restoreQuarantined(host: string, id: string): Promise<QuarantineEntry> {
    return requestJson(this.#url, 'POST', `/v1/hosts/${encodeURIComponent(host)}/quarantine/${encodeURIComponent(id)}/restore`, { body: {}, tls: this.#tls, server: controller });
  }

  purgeQuarantined(host: string, id: string): Promise<void> {
    return requestJson(this.#url, 'DELETE', `/v1/hosts/${encodeURIComponent(host)}/quarantine/${encodeURIComponent(id)}`, { tls: this.#tls, server: controller });
  }

  vms(): Promise<VmInfo[]> {
    return requestJson(this.#url, 'GET', '/v1/vms', { tls: this.#tls, server: controller });
  }

  vm(name: string): Promise<VmInfo> {
    return requestJson(this.#url, 'GET', `/v1/vms/${encodeURIComponent(name)}`, { tls: this.#tls, server: controller });
  }

  createVm(host: string, vm: CreateVmRequest): Promise<VmInfo> {
    // An imported image is converted before the agent answers.
    return requestJson(this.#url, 'POST', '/v1/vms', { body: { host, vm }, timeoutMs: importTimeoutMs, tls: this.#tls, server: controller });
  }

  startVm(name: string): Promise<VmInfo> {
    return requestJson(this.#url, 'POST', `/v1/vms/${encodeURIComponent(name)}/start`, { body: {}, timeoutMs: 60_000, tls: this.#tls, server: controller });
  }

  stopVm(name: string, force: boolean): Promise<VmInfo> {
    return requestJson(this.#url, 'POST', `/v1/vms/${encodeURIComponent(name)}/stop${force ? '?force=true' : ''}`, { body: {}, timeoutMs: 60_000, tls: this.#tls, server: controller });
  }

  deleteVm(name: string): Promise<void> {
    return requestJson(this.#url, 'DELETE', `/v1/vms/${encodeURIComponent(name)}`, { tls: this.#tls, server: controller });
  }

  migrate(request: MigrateRequest): Promise<{ plan: MigrationPlan; id?: string }> {
    return requestJson(this.#url, 'POST', '/v1/migrations', { body: request, timeoutMs: 120_000, tls: this.#tls, server: controller });
  }

  migrations(): Promise<MigrationRecord[]> {
    return requestJson(this.#url, 'GET', '/v1/migrations', { tls: this.#tls, server: controller });
  }

  migration(id: string): Promise<MigrationRecord> {
    return requestJson(this.#url, 'GET', `/v1/migrations/${encodeURIComponent(id)}`, { tls: this.#tls, server: controller });
  }

  events(id: string, after: number): Promise<{ phase: string; events: StoredEvent[]; report: MigrationReport | null }> {
    return requestJson(this.#url, 'GET', `/v1/migrations/${encodeURIComponent(id)}/events?after=${after}`, { tls: this.#tls, server: controller });
  }

  drainHost(host: string, request: { to?: string[]; parallel?: number; bandwidthMiBs?: number }): Promise<DrainStatus> {
    // Answered once every VM of the host has been listed, before any migration moves.
    return requestJson(this.#url, 'POST', `/v1/hosts/${encodeURIComponent(host)}/drain`, { body: request, timeoutMs: 60_000, tls: this.#tls, server: controller });
  }

  undrainHost(host: string): Promise<{ host: string; draining: false }> {
    return requestJson(this.#url, 'POST', `/v1/hosts/${encodeURIComponent(host)}/undrain`, { body: {}, tls: this.#tls, server: controller });
  }

  drain(id: string): Promise<DrainStatus> {
    return requestJson(this.#url, 'GET', `/v1/drains/${encodeURIComponent(id)}`, { tls: this.#tls, server: controller });
  }

  /** The migration's live stream (event-stream.ts): `progress` messages after `after`, then its `report`. A standby streams too. */
  async *migrationStream(id: string, after: number, signal: AbortSignal): AsyncGenerator<EventSourceMessage> {
    const url = currentController(this.#url);
    try {
      yield* readEventStream(url, `/v1/migrations/${encodeURIComponent(id)}/stream?after=${after}`, { tls: this.#tls, server: controller, signal });
    } catch (err) {
      // The caller opens the stream again (followMigration): from the next controller, if this one is gone.
      if (hasCode(err, 'VMF_UNREACHABLE')) passOver(this.#url, url);
      throw err;
    }
  }

  /** Settles an unresolved migration on the host the operator chose; answers once it is settled. */
  resolve(id: string, runOn: string): Promise<MigrationRecord> {
    return requestJson(this.#url, 'POST', `/v1/migrations/${encodeURIComponent(id)}/resolve`, { body: { runOn }, timeoutMs: 240_000, tls: this.#tls, server: controller });
  }

  cancel(id: string): Promise<MigrationRecord> {
    return requestJson(this.#url, 'POST', `/v1/migrations/${encodeURIComponent(id)}/cancel`, { body: {}, tls: this.#tls, server: controller });
  }
}

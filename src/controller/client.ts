/** The controller's API as the CLI uses it. */
import type { CreateVmRequest, QuarantineEntry, VmInfo } from '../api/agent-types.ts';
import type { HostStatus } from './inventory.ts';
import { requestJson } from '../http/errors.ts';
import type { MigrationPlan } from '../migration/plan.ts';
import type { MigrationReport } from '../migration/phases.ts';
import type { MigrationRecord, StoredEvent } from '../store/store.ts';
import type { MigrateRequest } from '../api/controller-types.ts';
import type { TlsIdentity } from '../security/tls-files.ts';

export class ControllerClient {
  readonly #url: string;
  readonly #tls: TlsIdentity | undefined;

  /** tls: the identity presented to the controller (an operator's, with mutual TLS). */
  constructor(url: string, tls?: TlsIdentity) {
    this.#url = url;
    this.#tls = tls;
  }

  hosts(): Promise<HostStatus[]> {
    return requestJson(this.#url, 'GET', '/v1/hosts', { tls: this.#tls });
  }

  quarantine(host: string): Promise<QuarantineEntry[]> {
    return requestJson(this.#url, 'GET', `/v1/hosts/${encodeURIComponent(host)}/quarantine`, { tls: this.#tls });
  }

  restoreQuarantined(host: string, id: string): Promise<QuarantineEntry> {
    return requestJson(this.#url, 'POST', `/v1/hosts/${encodeURIComponent(host)}/quarantine/${encodeURIComponent(id)}/restore`, { body: {}, tls: this.#tls });
  }

  purgeQuarantined(host: string, id: string): Promise<void> {
    return requestJson(this.#url, 'DELETE', `/v1/hosts/${encodeURIComponent(host)}/quarantine/${encodeURIComponent(id)}`, { tls: this.#tls });
  }

  vms(): Promise<VmInfo[]> {
    return requestJson(this.#url, 'GET', '/v1/vms', { tls: this.#tls });
  }

  vm(name: string): Promise<VmInfo> {
    return requestJson(this.#url, 'GET', `/v1/vms/${encodeURIComponent(name)}`, { tls: this.#tls });
  }

  createVm(host: string, vm: CreateVmRequest): Promise<VmInfo> {
    return requestJson(this.#url, 'POST', '/v1/vms', { body: { host, vm }, tls: this.#tls });
  }

  startVm(name: string): Promise<VmInfo> {
    return requestJson(this.#url, 'POST', `/v1/vms/${encodeURIComponent(name)}/start`, { body: {}, timeoutMs: 60_000, tls: this.#tls });
  }

  stopVm(name: string, force: boolean): Promise<VmInfo> {
    return requestJson(this.#url, 'POST', `/v1/vms/${encodeURIComponent(name)}/stop${force ? '?force=true' : ''}`, { body: {}, timeoutMs: 60_000, tls: this.#tls });
  }

  deleteVm(name: string): Promise<void> {
    return requestJson(this.#url, 'DELETE', `/v1/vms/${encodeURIComponent(name)}`, { tls: this.#tls });
  }

  migrate(request: MigrateRequest): Promise<{ plan: MigrationPlan; id?: string }> {
    return requestJson(this.#url, 'POST', '/v1/migrations', { body: request, timeoutMs: 120_000, tls: this.#tls });
  }

  migrations(): Promise<MigrationRecord[]> {
    return requestJson(this.#url, 'GET', '/v1/migrations', { tls: this.#tls });
  }

  migration(id: string): Promise<MigrationRecord> {
    return requestJson(this.#url, 'GET', `/v1/migrations/${encodeURIComponent(id)}`, { tls: this.#tls });
  }

  events(id: string, after: number): Promise<{ phase: string; events: StoredEvent[]; report: MigrationReport | null }> {
    return requestJson(this.#url, 'GET', `/v1/migrations/${encodeURIComponent(id)}/events?after=${after}`, { tls: this.#tls });
  }

  cancel(id: string): Promise<MigrationRecord> {
    return requestJson(this.#url, 'POST', `/v1/migrations/${encodeURIComponent(id)}/cancel`, { body: {}, tls: this.#tls });
  }
}

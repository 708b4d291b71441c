/** The controller's API as the CLI uses it. */
import type { CreateVmRequest, QuarantineEntry, VmInfo } from '../api/agent-types.ts';
import type { HostStatus } from './inventory.ts';
import { requestJson } from '../http/errors.ts';
import { importTimeoutMs } from '../storage/disk-images.ts';
import type { MigrationPlan } from '../migration/plan.ts';
import type { MigrationReport } from '../migration/phases.ts';
import type { MigrationRecord, StoredEvent } from '../store/store.ts';
import type { MigrateRequest } from '../api/controller-types.ts';

export class ControllerClient {
  readonly #url: string;

  constructor(url: string) {
    this.#url = url;
  }

  hosts(): Promise<HostStatus[]> {
    return requestJson(this.#url, 'GET', '/v1/hosts');
  }

  quarantine(host: string): Promise<QuarantineEntry[]> {
    return requestJson(this.#url, 'GET', `/v1/hosts/${encodeURIComponent(host)}/quarantine`);
  }

  restoreQuarantined(host: string, id: string): Promise<QuarantineEntry> {
    return requestJson(this.#url, 'POST', `/v1/hosts/${encodeURIComponent(host)}/quarantine/${encodeURIComponent(id)}/restore`, { body: {} });
  }

  purgeQuarantined(host: string, id: string): Promise<void> {
    return requestJson(this.#url, 'DELETE', `/v1/hosts/${encodeURIComponent(host)}/quarantine/${encodeURIComponent(id)}`);
  }

  vms(): Promise<VmInfo[]> {
    return requestJson(this.#url, 'GET', '/v1/vms');
  }

  vm(name: string): Promise<VmInfo> {
    return requestJson(this.#url, 'GET', `/v1/vms/${encodeURIComponent(name)}`);
  }

  createVm(host: string, vm: CreateVmRequest): Promise<VmInfo> {
    // An imported image is converted before the agent answers.
    return requestJson(this.#url, 'POST', '/v1/vms', { body: { host, vm }, timeoutMs: importTimeoutMs });
  }

  startVm(name: string): Promise<VmInfo> {
    return requestJson(this.#url, 'POST', `/v1/vms/${encodeURIComponent(name)}/start`, { body: {}, timeoutMs: 60_000 });
  }

  stopVm(name: string, force: boolean): Promise<VmInfo> {
    return requestJson(this.#url, 'POST', `/v1/vms/${encodeURIComponent(name)}/stop${force ? '?force=true' : ''}`, { body: {}, timeoutMs: 60_000 });
  }

  deleteVm(name: string): Promise<void> {
    return requestJson(this.#url, 'DELETE', `/v1/vms/${encodeURIComponent(name)}`);
  }

  migrate(request: MigrateRequest): Promise<{ plan: MigrationPlan; id?: string }> {
    return requestJson(this.#url, 'POST', '/v1/migrations', { body: request, timeoutMs: 120_000 });
  }

  migrations(): Promise<MigrationRecord[]> {
    return requestJson(this.#url, 'GET', '/v1/migrations');
  }

  migration(id: string): Promise<MigrationRecord> {
    return requestJson(this.#url, 'GET', `/v1/migrations/${encodeURIComponent(id)}`);
  }

  events(id: string, after: number): Promise<{ phase: string; events: StoredEvent[]; report: MigrationReport | null }> {
    return requestJson(this.#url, 'GET', `/v1/migrations/${encodeURIComponent(id)}/events?after=${after}`);
  }

  cancel(id: string): Promise<MigrationRecord> {
    return requestJson(this.#url, 'POST', `/v1/migrations/${encodeURIComponent(id)}/cancel`, { body: {} });
  }
}

/**
 * The agent's API from the outside: a typed client, and the two migration
 * sides implemented over it, so the executor drives agents exactly as it
 * drives in-process QEMUs.
 */
import { importTimeoutMs } from '../storage/disk-images.ts';
import type { CreateVmRequest, HostInfo, MigrationHalves, QuarantineEntry, VmInfo } from '../api/agent-types.ts';
import { requestJson } from '../http/errors.ts';
import { retryIdempotent } from '../http/retry.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import type { DestinationFacts, MigrationPlan, SourceFacts, CopyMode } from '../migration/plan.ts';
import type { GuestRamFacts } from '../migration/prediction.ts';
import type {
  DestinationResumed,
  DestinationSide,
  IncomingRunnable,
  MigrationMilestone,
  MigrationSettings,
  MirrorStatus,
  MirrorTarget,
  PreparedDestination,
  SourceCompletion,
  SourceRolledBack,
  SourceSide,
} from '../migration/sides.ts';
import type { MemoryDigest } from '../qemu/memory-digest.ts';
import type { DestinationFate } from '../migration/no-return.ts';
import type { GuestReset } from '../migration/phases.ts';
import type { VmSpec } from '../qemu/spec.ts';
import type { MigrationInfo } from '../qmp/commands.ts';
import { epochHeaders, type EpochStamp } from './leader-epoch.ts';

/** Waits that last as long as a phase of a migration: the migration's own deadline governs them. */
const longWaitMs = 24 * 3600 * 1000;

/** Dumping and hashing up to 2 GiB of guest memory. */
const memoryDigestTimeoutMs = 120_000;

export class AgentClient {
  readonly url: string;
  readonly #tls: TlsIdentity | undefined;
  readonly #hostId: string | undefined;
  readonly #stamp: EpochStamp | undefined;

  /**
   * tls: the identity presented to the agent (the controller's, with mutual TLS); hostId: the host whose agent's
   * certificate the server must show; stamp: the leader epoch requests carry, with several controllers.
   */
  constructor(url: string, tls?: TlsIdentity, hostId?: string, stamp?: EpochStamp) {
    this.url = url;
    this.#tls = tls;
    this.#hostId = hostId;
    this.#stamp = stamp;
  }

  request<T>(method: string, path: string, body?: unknown, options: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<T> {
    // Anything but a GET may make the host act: a controller that does not lead refuses to send it at all.
    const headers = epochHeaders(method === 'GET' ? this.#stamp?.reading() : this.#stamp?.acting());
    return requestJson<T>(this.url, method, path, { body, ...options, headers, tls: this.#tls, server: { role: 'agent', id: this.#hostId } });
  }

  /**
   * A request whose repetition cannot change what the first one did (a read,
   * a status poll, a call the agent handles idempotently): a reset connection
   * is retried with backoff (src/http/retry.ts). Every other call goes through
   * request() once.
   */
  idempotent<T>(method: string, path: string, body?: unknown, options: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<T> {
    return retryIdempotent(`${method} ${path} on ${this.#hostId ?? this.url}`, () => this.request<T>(method, path, body, options), { signal: options.signal });
  }

  host(signal?: AbortSignal): Promise<HostInfo> {
    return this.idempotent('GET', '/v1/host', undefined, { signal, timeoutMs: 5_000 });
  }

  listVms(): Promise<VmInfo[]> {
    return this.idempotent('GET', '/v1/vms');
  }

  /** What this host holds of a migration (its source or destination half, if any). */
  migrationHalves(id: string): Promise<MigrationHalves> {
    return this.idempotent('GET', `/v1/migrations/${encodeURIComponent(id)}`, undefined, { timeoutMs: 10_000 });
  }

  getVm(name: string): Promise<VmInfo> {
    return this.idempotent('GET', `/v1/vms/${encodeURIComponent(name)}`);
  }

  createVm(request: CreateVmRequest): Promise<VmInfo> {
    // An imported image is converted before the agent answers.
    return this.request('POST', '/v1/vms', request, { timeoutMs: importTimeoutMs });
  }

  startVm(name: string): Promise<VmInfo> {
    return this.request('POST', `/v1/vms/${encodeURIComponent(name)}/start`, {}, { timeoutMs: 60_000 });
  }

  stopVm(name: string, force = false): Promise<VmInfo> {
    return this.request('POST', `/v1/vms/${encodeURIComponent(name)}/stop${force ? '?force=true' : ''}`, {}, { timeoutMs: 60_000 });
  }

  deleteVm(name: string): Promise<void> {
    return this.request('DELETE', `/v1/vms/${encodeURIComponent(name)}`);
  }

  quarantine(): Promise<QuarantineEntry[]> {
    return this.idempotent('GET', '/v1/quarantine');
  }

  restoreQuarantined(id: string): Promise<QuarantineEntry> {
    return this.request('POST', `/v1/quarantine/${encodeURIComponent(id)}/restore`, {});
  }

  purgeQuarantined(id: string): Promise<void> {
    return this.request('DELETE', `/v1/quarantine/${encodeURIComponent(id)}`);
  }

  probeSource(vm: string): Promise<SourceFacts> {
    return this.idempotent('POST', `/v1/vms/${encodeURIComponent(vm)}/probe-source`, {}, { timeoutMs: 60_000 });
  }

  measureGuestRam(vm: string): Promise<GuestRamFacts> {
    return this.idempotent('POST', `/v1/vms/${encodeURIComponent(vm)}/measure-ram`, {}, { timeoutMs: 30_000 });
  }

  probeDestination(spec: VmSpec): Promise<DestinationFacts> {
    return this.idempotent('POST', '/v1/probe-destination', { spec }, { timeoutMs: 60_000 });
  }
}

export class RemoteDestination implements DestinationSide {
  readonly hostId: string;
  readonly #agent: AgentClient;
  readonly #path: string;

  constructor(hostId: string, agent: AgentClient, migrationId: string) {
    this.hostId = hostId;
    this.#agent = agent;
    this.#path = `/v1/migrations/${encodeURIComponent(migrationId)}/destination`;
  }

  prepare(spec: VmSpec, plan: MigrationPlan, signal: AbortSignal): Promise<PreparedDestination> {
    return this.#agent.request('POST', `${this.#path}/prepare`, { spec, plan }, { signal, timeoutMs: 120_000 });
  }

  async waitIncomingCompleted(signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/wait-incoming`, {}, { signal, timeoutMs: longWaitMs });
  }

  async waitIncomingRunnable(signal: AbortSignal): Promise<IncomingRunnable> {
    return (await this.#agent.request<{ runnable: IncomingRunnable }>('POST', `${this.#path}/wait-runnable`, {}, { signal, timeoutMs: longWaitMs })).runnable;
  }

  memoryDigest(signal: AbortSignal): Promise<MemoryDigest> {
    return this.#agent.request('POST', `${this.#path}/memory-digest`, {}, { signal, timeoutMs: memoryDigestTimeoutMs });
  }

  async recoverPostcopy(signal: AbortSignal): Promise<string> {
    return (await this.#agent.request<{ uri: string }>('POST', `${this.#path}/postcopy-recover`, {}, { signal, timeoutMs: 60_000 })).uri;
  }

  async postcopyResets(signal: AbortSignal): Promise<GuestReset[]> {
    return (await this.#agent.request<{ resets: GuestReset[] }>('POST', `${this.#path}/postcopy-resets`, {}, { signal })).resets;
  }

  async resume(signal: AbortSignal): Promise<DestinationResumed> {
    const reply = await this.#agent.request<Partial<DestinationResumed>>('POST', `${this.#path}/resume`, {}, { signal, timeoutMs: 60_000 });
    // An agent of the previous version answers {}: the moment is then not known.
    return { resumedAtUs: reply.resumedAtUs ?? null };
  }

  async fate(signal: AbortSignal): Promise<DestinationFate> {
    return (await this.#agent.idempotent<{ fate: DestinationFate }>('POST', `${this.#path}/fate`, {}, { signal, timeoutMs: 90_000 })).fate;
  }

  async rollback(): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/rollback`, {}, { timeoutMs: 120_000 });
  }

  /** An operator chose this host for a migration whose guest may have run here: the VM, stopped (MigrationSides.takeBackDestination). */
  takeBack(): Promise<VmInfo> {
    return this.#agent.request('POST', `${this.#path}/take-back`, {}, { timeoutMs: 60_000 });
  }
}

export class RemoteSource implements SourceSide {
  readonly hostId: string;
  readonly #agent: AgentClient;
  readonly #path: string;

  constructor(hostId: string, agent: AgentClient, migrationId: string) {
    this.hostId = hostId;
    this.#agent = agent;
    this.#path = `/v1/migrations/${encodeURIComponent(migrationId)}/source`;
  }

  /** Binds the migration to its VM on the source, and to the plan's destination: the only address its disks and RAM may go to. */
  async begin(plan: MigrationPlan): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/begin`, { plan });
  }

  async startMirrors(targets: MirrorTarget[], copyMode: CopyMode, bandwidthBytes: number | undefined, signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/mirrors`, { targets, copyMode, bandwidthBytes }, { signal, timeoutMs: 60_000 });
  }

  mirrorStatus(signal: AbortSignal, waitMs = 0): Promise<MirrorStatus[]> {
    return this.#agent.idempotent('GET', `${this.#path}/mirrors?waitMs=${waitMs}`, undefined, { signal, timeoutMs: waitMs + 30_000 });
  }

  async startMigration(uri: string, settings: MigrationSettings, signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/migrate`, { uri, settings }, { signal });
  }

  migrationInfo(signal: AbortSignal): Promise<MigrationInfo> {
    return this.#agent.idempotent('GET', `${this.#path}/info`, undefined, { signal });
  }

  async waitMilestone(signal: AbortSignal): Promise<MigrationMilestone> {
    // The agent answers within its own bound (10 s) with a milestone or null; a migration takes as many asks as it needs.
    // Not retried: the agent hands each milestone out once, and a reply lost with it would leave a retry waiting for one that passed.
    for (;;) {
      const reply = await this.#agent.request<{ milestone: MigrationMilestone | null }>('POST', `${this.#path}/wait-milestone`, {}, { signal, timeoutMs: 60_000 });
      if (reply.milestone) return reply.milestone;
    }
  }

  async setDowntimeLimit(ms: number, signal: AbortSignal): Promise<void> {
    await this.#agent.idempotent('POST', `${this.#path}/downtime-limit`, { ms }, { signal });
  }

  async startPostcopy(signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/postcopy`, {}, { signal });
  }

  async pausePostcopy(signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/postcopy-pause`, {}, { signal, timeoutMs: 60_000 });
  }

  async resumePostcopy(uri: string, signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/postcopy-resume`, { uri }, { signal });
  }

  /** Caps its mirrors and RAM stream from now on (QemuSource.setBandwidth); setting the same cap twice is harmless, so it is retried. */
  async setBandwidth(bytesPerSecond: number, signal: AbortSignal): Promise<void> {
    await this.#agent.idempotent('POST', `${this.#path}/bandwidth`, { bytesPerSecond }, { signal });
  }

  async releaseThrottle(signal: AbortSignal): Promise<void> {
    await this.#agent.idempotent('POST', `${this.#path}/release-throttle`, {}, { signal });
  }

  async stopGuest(signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/stop-guest`, {}, { signal });
  }

  finishMirrors(signal: AbortSignal): Promise<{ diskId: string; bytesSent: number }[]> {
    return this.#agent.request('POST', `${this.#path}/finish-mirrors`, {}, { signal, timeoutMs: longWaitMs });
  }

  async continueSwitchover(signal: AbortSignal): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/continue`, {}, { signal });
  }

  memoryDigest(signal: AbortSignal): Promise<MemoryDigest> {
    return this.#agent.request('POST', `${this.#path}/memory-digest`, {}, { signal, timeoutMs: memoryDigestTimeoutMs });
  }

  completedInfo(signal: AbortSignal): Promise<SourceCompletion> {
    return this.#agent.idempotent('GET', `${this.#path}/completed-info`, undefined, { signal });
  }

  async retire(keepLocalDisks: boolean): Promise<void> {
    await this.#agent.request('POST', `${this.#path}/retire`, { keepLocalDisks }, { timeoutMs: 60_000 });
  }

  async rollback(): Promise<SourceRolledBack> {
    const reply = await this.#agent.request<Partial<SourceRolledBack>>('POST', `${this.#path}/rollback`, {}, { timeoutMs: 120_000 });
    return { pauseMs: reply.pauseMs ?? null };
  }
}

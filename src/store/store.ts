/**
 * The controller's persistent state behind one interface, so a second engine
 * (PostgreSQL, for several controllers) can stand in for the default SQLite file.
 */
import type { MigrationEvent, MigrationPhase, MigrationReport } from '../migration/phases.ts';
import type { MigrationPlan } from '../migration/plan.ts';

export interface HostRecord {
  id: string;
  /** The agent's API URL. */
  url: string;
  /** The address other hosts reach this one at. */
  address: string;
  /** What runs the host's guests, and why, as its agent last reported; absent from agents older than this field. */
  accelerator?: 'kvm' | 'tcg';
  acceleratorReason?: string;
  lastSeen: number;
}

export interface VmLocation {
  name: string;
  hostId: string;
}

export interface MigrationRecord {
  id: string;
  vm: string;
  from: string;
  to: string;
  phase: MigrationPhase;
  plan: MigrationPlan;
  report: MigrationReport | null;
  createdAt: number;
  updatedAt: number;
}

export interface StoredEvent {
  seq: number;
  at: number;
  event: MigrationEvent;
}

/** A leader's hold on the lease row (src/controller/leader-lease.ts): who, under which epoch. */
export interface LeaseToken {
  holder: string;
  epoch: number;
}

export interface DrainedVm {
  vm: string;
  state: 'waiting' | 'migrating' | 'completed' | 'failed' | 'cancelled' | 'unresolved' | 'skipped';
  to?: string;
  migrationId?: string;
  /** The migration's phase while it runs. */
  phase?: string;
  /** Why it failed or was skipped. */
  reason?: string;
  /** The cap its migration has now, bytes/s (its share of the budget). */
  shareBytes?: number;
  /** From its report: RAM and mirrored disk bytes sent, the whole migration, the guest's pause. */
  sentBytes?: number;
  totalMs?: number;
  downtimeMs?: number | null;
  /** When its RAM or disks began to move and when that ended (the report's phases), for the budget check. */
  transfer?: { from: number; until: number };
}

/** A host drain (src/controller/drain.ts), stored as it changes so `vmferry host drain` status outlives its controller. */
export interface DrainStatus {
  id: string;
  host: string;
  to: string[] | null;
  parallel: number;
  bandwidthMiBs: number | null;
  state: 'running' | 'done' | 'stopped';
  startedAt: number;
  endedAt: number | null;
  vms: DrainedVm[];
  /** Measured over the drain, from its migrations' reports: bytes sent, the time any of them was sending, and their ratio. */
  transfer: { bytes: number; busyMs: number; bytesPerSecond: number } | null;
}

export interface Store {
  /**
   * This store, its writes of migrations, VM locations and drains refused by the database itself once `lease`
   * is no longer held (expired or taken over): a leader paused between its own check and the write cannot
   * overwrite what its successor stored. Host heartbeats and reads are unchanged. The view is not closed: the store is.
   */
  fencedBy(lease: LeaseToken): Store;

  upsertHost(host: HostRecord): Promise<void>;
  listHosts(): Promise<HostRecord[]>;
  getHost(id: string): Promise<HostRecord | undefined>;

  /** Marks a host draining (`vmferry host drain`): no VM is created on it or migrated to it until it is undrained. */
  setHostDraining(id: string, draining: boolean): Promise<void>;
  drainingHosts(): Promise<string[]>;
  /** Stores a drain's status, replacing what was stored of it. */
  saveDrain(drain: DrainStatus): Promise<void>;
  getDrain(id: string): Promise<DrainStatus | undefined>;
  /** The newest `limit` drains, newest first. */
  listDrains(limit: number): Promise<DrainStatus[]>;

  setVmLocation(location: VmLocation): Promise<void>;
  getVmLocation(name: string): Promise<VmLocation | undefined>;
  deleteVmLocation(name: string): Promise<void>;

  createMigration(record: MigrationRecord): Promise<void>;
  updateMigration(id: string, patch: { phase?: MigrationPhase; report?: MigrationReport }): Promise<void>;
  getMigration(id: string): Promise<MigrationRecord | undefined>;
  listMigrations(limit: number): Promise<MigrationRecord[]>;
  /** The migration of `vm` that has not reached a final phase, if any. */
  activeMigration(vm: string): Promise<MigrationRecord | undefined>;
  /** Every migration that has not reached a final phase, oldest first: what a restarted controller must settle. */
  unfinishedMigrations(): Promise<MigrationRecord[]>;
  appendEvent(migrationId: string, event: MigrationEvent): Promise<void>;
  eventsSince(migrationId: string, afterSeq: number): Promise<StoredEvent[]>;

  close(): Promise<void>;
}

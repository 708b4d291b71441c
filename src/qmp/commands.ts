/**
 * Typed wrappers for the QMP commands vmferry uses. Argument and reply shapes
 * follow QEMU 7.2's schema (qapi/*.json); only the fields we read are typed.
 */
import type { JsonObject } from './message-stream.ts';
import type { ExecuteOptions, QmpClient } from './client.ts';

export type RunState =
  | 'debug' | 'inmigrate' | 'internal-error' | 'io-error' | 'paused' | 'postmigrate' | 'prelaunch'
  | 'finish-migrate' | 'restore-vm' | 'running' | 'save-vm' | 'shutdown' | 'suspended' | 'watchdog'
  | 'guest-panicked' | 'colo';

export interface StatusInfo {
  running: boolean;
  status: RunState;
}

export type MigrationStatus =
  | 'none' | 'setup' | 'cancelling' | 'cancelled' | 'active' | 'postcopy-active' | 'postcopy-paused'
  | 'postcopy-recover' | 'completed' | 'failed' | 'colo' | 'pre-switchover' | 'device' | 'wait-unplug';

export interface MigrationRamStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  'dirty-sync-count': number;
  'page-size': number;
  mbps: number;
  'postcopy-requests'?: number;
}

export interface MigrationInfo {
  status?: MigrationStatus;
  ram?: MigrationRamStats;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  'cpu-throttle-percentage'?: number;
  'error-desc'?: string;
}

export type MigrationCapability =
  | 'xbzrle' | 'rdma-pin-all' | 'auto-converge' | 'zero-blocks' | 'compress' | 'events' | 'postcopy-ram'
  | 'x-colo' | 'release-ram' | 'block' | 'return-path' | 'pause-before-switchover' | 'multifd'
  | 'dirty-bitmaps' | 'postcopy-blocktime' | 'late-block-activate' | 'x-ignore-shared'
  | 'validate-uuid' | 'background-snapshot' | 'zero-copy-send' | 'postcopy-preempt';

export interface MigrationParameters {
  'max-bandwidth'?: number;
  'downtime-limit'?: number;
  'cpu-throttle-initial'?: number;
  'cpu-throttle-increment'?: number;
  /** The highest throttle auto-converge may reach (percent, at least cpu-throttle-initial). */
  'max-cpu-throttle'?: number;
  'max-postcopy-bandwidth'?: number;
  'multifd-channels'?: number;
  /** The id of a tls-creds object: the stream runs over TLS; empty: plain TCP. */
  'tls-creds'?: string;
  /** The name the source checks the destination's certificate against. */
  'tls-hostname'?: string;
  /** The id of an authz object the destination asks about each client's certificate name. */
  'tls-authz'?: string;
}

export type BlockJobStatus =
  | 'undefined' | 'created' | 'running' | 'paused' | 'waiting' | 'pending' | 'aborting' | 'concluded' | 'null' | 'ready' | 'standby';

export interface BlockJobInfo {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  ready: boolean;
  status: BlockJobStatus;
  'auto-finalize': boolean;
  'auto-dismiss': boolean;
  error?: string;
}

export interface MirrorArguments {
  'job-id': string;
  device: string;
  target: string;
  sync: 'full' | 'top' | 'none';
  speed?: number;
  'copy-mode'?: 'background' | 'write-blocking';
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
  'on-source-error'?: 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
  'on-target-error'?: 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
  'granularity'?: number;
  'buf-size'?: number;
}

export type SocketAddress =
  | { type: 'inet'; host: string; port: string }
  | { type: 'unix'; path: string };

export interface BlockDeviceInfo {
  device: string;
  qdev?: string;
  inserted?: { 'node-name': string; ro: boolean; drv: string; file: string; image: { 'virtual-size': number } };
}

export interface BlockStatsEntry {
  device: string;
  qdev?: string;
  'node-name'?: string;
  stats: { rd_bytes: number; wr_bytes: number; flush_operations: number; wr_operations: number; rd_operations: number };
}

export interface DirtyRateInfo {
  status: 'unstarted' | 'measuring' | 'measured';
  /** MiB/s, whole; present once measured. */
  'dirty-rate'?: number;
  mode: string;
  'calc-time': number;
}

/** A QMP client with the commands vmferry uses, each typed. */
export class QemuMonitor {
  readonly client: QmpClient;

  constructor(client: QmpClient) {
    this.client = client;
  }

  queryStatus(options?: ExecuteOptions): Promise<StatusInfo> {
    return this.client.execute('query-status', undefined, options);
  }

  stop(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('stop', undefined, options);
  }

  queryKvm(options?: ExecuteOptions): Promise<{ enabled: boolean; present: boolean }> {
    return this.client.execute('query-kvm', undefined, options);
  }

  cont(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('cont', undefined, options);
  }

  /** Makes the guest's NICs known on the network where it now runs: RARP/GARP rounds, timing in ms. */
  announceSelf(timing: { initial: number; max: number; rounds: number; step: number }, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('announce-self', { ...timing }, options);
  }

  quit(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('quit', undefined, options);
  }

  systemPowerdown(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('system_powerdown', undefined, options);
  }

  objectAdd(object: JsonObject & { 'qom-type': string; id: string }, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('object-add', object, options);
  }

  blockdevAdd(node: JsonObject, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('blockdev-add', node, options);
  }

  blockdevDel(nodeName: string, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('blockdev-del', { 'node-name': nodeName }, options);
  }

  blockdevMirror(args: MirrorArguments, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('blockdev-mirror', args as unknown as JsonObject, options);
  }

  queryBlockJobs(options?: ExecuteOptions): Promise<BlockJobInfo[]> {
    return this.client.execute('query-block-jobs', undefined, options);
  }

  blockJobCancel(device: string, force = false, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('block-job-cancel', { device, force }, options);
  }

  blockJobComplete(device: string, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('block-job-complete', { device }, options);
  }

  jobDismiss(id: string, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('job-dismiss', { id }, options);
  }

  queryBlock(options?: ExecuteOptions): Promise<BlockDeviceInfo[]> {
    return this.client.execute('query-block', undefined, options);
  }

  queryBlockstats(options?: ExecuteOptions): Promise<BlockStatsEntry[]> {
    return this.client.execute('query-blockstats', undefined, options);
  }

  /** `tls`: clients must negotiate TLS with these credentials, and pass the authz object when one is named. */
  nbdServerStart(addr: SocketAddress, tls?: { creds: string; authz?: string }, options?: ExecuteOptions): Promise<void> {
    // nbd-server-start still takes the legacy (nested "data") socket address form.
    const { type, ...data } = addr;
    const security = tls ? { 'tls-creds': tls.creds, ...(tls.authz === undefined ? {} : { 'tls-authz': tls.authz }) } : {};
    return this.client.execute('nbd-server-start', { addr: { type, data }, ...security }, options);
  }

  nbdServerStop(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('nbd-server-stop', undefined, options);
  }

  blockExportAdd(args: { id: string; nodeName: string; name: string; writable: boolean }, options?: ExecuteOptions): Promise<void> {
    return this.client.execute(
      'block-export-add',
      { type: 'nbd', id: args.id, 'node-name': args.nodeName, name: args.name, writable: args.writable },
      options,
    );
  }

  blockExportDel(id: string, mode: 'safe' | 'hard' = 'safe', options?: ExecuteOptions): Promise<void> {
    return this.client.execute('block-export-del', { id, mode }, options);
  }

  migrate(uri: string, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate', { uri }, options);
  }

  migrateIncoming(uri: string, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate-incoming', { uri }, options);
  }

  migrateContinue(state: MigrationStatus, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate-continue', { state }, options);
  }

  migrateStartPostcopy(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate-start-postcopy', undefined, options);
  }

  /** Continues a post-copy whose stream broke (both ends `postcopy-paused`) over a new connection to `uri`, where the destination listens after migrate-recover. */
  migrateResume(uri: string, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate', { uri, resume: true }, options);
  }

  /**
   * Destination only, in `postcopy-paused`: listens on `uri` for the source's resumed stream. Out of band when
   * offered: QEMU then accepts on the monitor's thread, so it works while a vCPU waiting for a page holds the main loop.
   */
  migrateRecover(uri: string, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate-recover', { uri }, { ...options, oob: this.client.oobEnabled });
  }

  /** Breaks the post-copy stream on this end (`postcopy-active` → `postcopy-paused`): for a dead link QEMU has not noticed. Out of band when offered. */
  migratePause(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate-pause', undefined, { ...options, oob: this.client.oobEnabled });
  }

  migrateSetCapabilities(capabilities: Partial<Record<MigrationCapability, boolean>>, options?: ExecuteOptions): Promise<void> {
    const list = Object.entries(capabilities).map(([capability, state]) => ({ capability, state }));
    return this.client.execute('migrate-set-capabilities', { capabilities: list }, options);
  }

  migrateSetParameters(parameters: MigrationParameters, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate-set-parameters', parameters as JsonObject, options);
  }

  queryMigrateParameters(options?: ExecuteOptions): Promise<MigrationParameters> {
    return this.client.execute('query-migrate-parameters', undefined, options);
  }

  queryMigrate(options?: ExecuteOptions): Promise<MigrationInfo> {
    return this.client.execute('query-migrate', undefined, options);
  }

  migrateCancel(options?: ExecuteOptions): Promise<void> {
    return this.client.execute('migrate_cancel', undefined, options);
  }

  /** Starts QEMU's estimate of the guest's dirty rate over `calcTimeS` (page-sampling: under TCG, QEMU 7.2's dirty-bitmap and dirty-ring modes crash it). */
  calcDirtyRate(calcTimeS: number, samplePagesPerGiB: number, options?: ExecuteOptions): Promise<void> {
    return this.client.execute('calc-dirty-rate', { 'calc-time': calcTimeS, 'sample-pages': samplePagesPerGiB, mode: 'page-sampling' }, options);
  }

  queryDirtyRate(options?: ExecuteOptions): Promise<DirtyRateInfo> {
    return this.client.execute('query-dirty-rate', undefined, options);
  }
}

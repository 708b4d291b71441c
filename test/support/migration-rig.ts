/**
 * Two "hosts" in one process for migration tests: host A runs the test guest
 * from its pool, host B has an empty pool, and shared volumes live on a
 * vmferry storage server both reach. Everything is real QEMU; the hosts differ only in
 * their directories.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { reportLogOf, testGuestSpec, waitForAcks, type GuestOptions, type GuestReport, type VerifyResult } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import { runAttempts } from '../../src/controller/attempts.ts';
import { runMigration } from '../../src/migration/executor.ts';
import type { MigrationEvent, MigrationPhase, MigrationReport } from '../../src/migration/phases.ts';
import { defaultMigrationOptions, planMigration, withRamMode, type MigrationOptions, type MigrationPlan, type RamMode } from '../../src/migration/plan.ts';
import { probeDestination, probeSource, qemuCapabilities } from '../../src/migration/probe.ts';
import { QemuDestination } from '../../src/migration/qemu-destination.ts';
import { QemuSource } from '../../src/migration/qemu-source.ts';
import type { PreparedDestination } from '../../src/migration/sides.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import { qemuPeerName } from '../../src/qemu/tls-creds.ts';
import type { DiskSpec, VmSpec } from '../../src/qemu/spec.ts';
import type { TlsIdentity } from '../../src/security/tls-files.ts';
import { LocalPool } from '../../src/storage/local-pool.ts';
import { createImage, removeImage, type CephClient } from '../../src/storage/rbd.ts';
import { Cleanup } from './cleanup.ts';
import { startTestStorage } from './storage.ts';
import { makeTempDir } from './temp.ts';

export interface RigLayout {
  local: { id: string; sizeMiB: number; fillMiB?: number }[];
  shared: { id: string; sizeMiB: number; readOnly?: boolean }[];
  /** Shared disks on RBD images, made in `pool` of the Ceph cluster `client` reaches (test/support/ceph.ts). */
  rbd?: { id: string; sizeMiB: number; client: CephClient; pool: string }[];
  /** The program A's QEMU runs as (default qemu-system-x86_64): a wrapper that stands in for an older agent's command line. */
  sourceBinary?: string;
}

/** Each host's agent TLS identity in QEMU's layout (`vmferry pki issue agent A|B`): every QEMU of the rig gets its host's credentials. */
export interface RigTls {
  A: string;
  B: string;
  /** The storage server's identity (`vmferry pki issue storage --address 127.0.0.1`): it takes TLS only, as the hosts' QEMUs expect. */
  storage: TlsIdentity;
}

/** Routes a migration URI through a stand-in link (a TcpRelay) and returns the URI to send to instead. */
export type StreamRelay = (uri: string) => Promise<string>;

/**
 * A destination that keeps its prepare answer, so a test can reach its exports as an outsider would,
 * and that hands the source its migration URIs through the test's relay, if any.
 */
export class RigDestination extends QemuDestination {
  prepared: PreparedDestination | undefined;
  relay: StreamRelay | undefined;

  override async prepare(...args: Parameters<QemuDestination['prepare']>): Promise<PreparedDestination> {
    const prepared = await super.prepare(...args);
    this.prepared = this.relay ? { ...prepared, migrationUri: await this.relay(prepared.migrationUri) } : prepared;
    return this.prepared;
  }

  override async recoverPostcopy(signal: AbortSignal): Promise<string> {
    const uri = await super.recoverPostcopy(signal);
    return this.relay ? this.relay(uri) : uri;
  }
}

export class MigrationRig {
  readonly cleanup = new Cleanup();
  dir = '';
  poolA!: LocalPool;
  poolB!: LocalPool;
  spec!: VmSpec;
  source!: QemuProcess;
  destination: QemuDestination | undefined;
  tls: RigTls | undefined;

  static async start(name: string, layout: RigLayout, guest: GuestOptions, tls?: RigTls): Promise<MigrationRig> {
    const rig = new MigrationRig();
    rig.tls = tls;
    try {
      await rig.#start(name, layout, guest);
    } catch (err) {
      await rig.cleanup.run();
      throw err;
    }
    return rig;
  }

  async #start(name: string, layout: RigLayout, guest: GuestOptions): Promise<void> {
    const temp = await makeTempDir(`migrate-${name}`);
    this.cleanup.add('remove temp dir', () => temp.remove());
    this.dir = temp.path;
    for (const sub of ['poolA', 'poolB', 'runA', 'runB', 'logs']) mkdirSync(join(this.dir, sub));
    this.poolA = new LocalPool(join(this.dir, 'poolA'));
    this.poolB = new LocalPool(join(this.dir, 'poolB'));
    const disks: DiskSpec[] = [];
    for (const local of layout.local) {
      const path = await this.poolA.create(`${name}-${local.id}.qcow2`, 'qcow2', local.sizeMiB * 1024 * 1024);
      // Data beyond the guest's record area, so the mirror has real bytes to carry.
      if (local.fillMiB) execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x6b ${local.sizeMiB - local.fillMiB}M ${local.fillMiB}M`, path], { stdio: 'ignore' });
      disks.push({ id: local.id, source: { kind: 'file', path, format: 'qcow2' } });
    }
    if (layout.shared.length > 0) {
      const storage = await startTestStorage(this.tls ? { tls: this.tls.storage } : {});
      this.cleanup.add('stop the storage server', () => storage.stop());
      for (const shared of layout.shared) {
        await storage.server.volumes.create(shared.id, shared.sizeMiB * 1024 * 1024, shared.readOnly ?? false);
        disks.push({ id: shared.id, source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, export: shared.id }, readOnly: shared.readOnly ?? false });
      }
    }
    for (const rbd of layout.rbd ?? []) {
      const image = `${name}-${rbd.id}`;
      await createImage(rbd.client, rbd.pool, image, rbd.sizeMiB * 1024 * 1024);
      this.cleanup.add(`remove RBD image ${image}`, () => removeImage(rbd.client, rbd.pool, image, true));
      disks.push({ id: rbd.id, source: { kind: 'rbd', pool: rbd.pool, image, ...rbd.client } });
    }
    // Host write-back of fresh images would compete with the mirror.
    execFileSync('sync');
    this.spec = testGuestSpec(name, disks, join(this.dir, 'logs'), guest);
    this.source = await QemuProcess.start(this.spec, { runDir: join(this.dir, 'runA', name), ...(this.tls ? { tlsDir: this.tls.A } : {}), ...(layout.sourceBinary ? { binary: layout.sourceBinary } : {}) });
    this.cleanup.add('stop source QEMU', () => this.source.kill());
    this.cleanup.add('stop destination QEMU', () => this.destination?.vm?.kill());
  }

  /** What the last destination `migrate` made answered to prepare. */
  get prepared(): PreparedDestination | undefined {
    return this.destination instanceof RigDestination ? this.destination.prepared : undefined;
  }

  writableDiskIds(): string[] {
    return this.spec.disks.filter((d) => !d.readOnly).map((d) => d.id);
  }

  /** Report logs in order: the source's, then the destination's once there is one. */
  reportLogs(): string[] {
    const logs = [reportLogOf(this.spec)];
    const destinationSpec = this.destination?.vm?.spec;
    if (destinationSpec) logs.push(reportLogOf(destinationSpec));
    return logs;
  }

  waitForAcks(atLeast: number, since?: Map<string, number>): Promise<GuestReport> {
    return waitForAcks(this.reportLogs(), this.writableDiskIds(), { atLeast, since, timeoutMs: 90_000 });
  }

  async plan(options: Partial<MigrationOptions> = {}, spec: VmSpec = this.spec): Promise<MigrationPlan> {
    const qemu = await qemuCapabilities();
    const sourceFacts = await probeSource('A', this.source, qemu);
    const destinationFacts = await probeDestination('B', '127.0.0.1', spec, this.poolB, [], qemu, this.tls?.B);
    return planMigration(spec, sourceFacts, destinationFacts, { ...defaultMigrationOptions, ...options });
  }

  /**
   * Migrates A → B. A rollback for a memory mismatch (QEMU's TCG defect,
   * docs/QEMU-TCG-PRECOPY.md) is retried as the controller does (runAttempts,
   * its report covering every attempt), unless `memoryMismatchRetries` is 0. With the rig's TLS identities both sides use
   * theirs (the destination lets in only A's), unless `withoutTls` names a side
   * whose agent acts as if it had none.
   */
  async migrate(
    plan: MigrationPlan,
    extra: {
      signal?: AbortSignal;
      onEvent?: (e: MigrationEvent) => void;
      beforePhase?: (phase: MigrationPhase) => Promise<void>;
      memoryMismatchRetries?: number;
      withoutTls?: 'source' | 'destination';
      /** The migration stream (and a recovered one) goes through this stand-in link. */
      relay?: StreamRelay;
    } = {},
  ): Promise<MigrationReport> {
    const { memoryMismatchRetries = 2, withoutTls, relay, ...input } = extra;
    const destinationTls = this.tls && withoutTls !== 'destination' ? { tlsDir: this.tls.B, agentPeerName: (id: string) => qemuPeerName('agent', id) } : {};
    const sourceTls = this.tls !== undefined && withoutTls !== 'source';
    const attempt = (ramMode: RamMode, onEvent = input.onEvent): Promise<MigrationReport> => {
      const destination = new RigDestination({ hostId: 'B', pool: this.poolB, vmDir: (vm) => join(this.dir, 'runB', vm), address: '127.0.0.1', ...destinationTls });
      destination.relay = relay;
      this.destination = destination;
      const source = new QemuSource({ hostId: 'A', vm: this.source, tls: sourceTls });
      return runMigration({ spec: this.spec, plan: withRamMode(plan, ramMode), source, destination, ...input, ...(onEvent ? { onEvent } : {}) });
    };
    if (memoryMismatchRetries === 0) return attempt(plan.ram.mode);
    // As the controller runs a migration, so the report covers every attempt (src/controller/attempts.ts).
    return runAttempts({
      run: (onEvent, ramMode) => attempt(ramMode, onEvent),
      ramMode: plan.ram.mode,
      fallback: plan.options.fallback,
      beforeRetry: () => Promise.resolve(),
      onEvent: input.onEvent ?? (() => undefined),
      signal: input.signal ?? new AbortController().signal,
    });
  }

  poolBFiles(): string[] {
    return readdirSync(this.poolB.dir);
  }

  /** Kills whichever QEMU runs the guest, then boots verify mode on `disks`. */
  async verify(disks: DiskSpec[]): Promise<Map<string, VerifyResult>> {
    await this.source.kill();
    await this.destination?.vm?.kill();
    mkdirSync(join(this.dir, 'verify'), { recursive: true });
    return verifyDisks(disks, join(this.dir, 'verify'), { spanMiB: 8, ...(this.tls ? { tlsDir: this.tls.B } : {}) });
  }
}

/**
 * What `vmferry demo` runs (registered in demo.ts): the main job end to end on one machine. A storage server, a
 * controller and two hosts; a VM with a local and a shared disk running the
 * test guest; live migration A → B and back while it writes; then the guest's
 * own verify mode checks every acknowledged record. In network namespaces the
 * VM also has a NIC on an L2 segment both hosts share, and a client pings it
 * and holds a TCP connection to it through both migrations. With
 * `--storage ceph` the shared disk is an RBD image on a throwaway Ceph cluster.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { VmferryError } from '../errors.ts';
import { LocalCluster } from '../demo/local-cluster.ts';
import { Pinger } from '../demo/pinger.ts';
import { StreamCheck } from '../demo/stream-check.ts';
import { checkVerify, readGuestReport, testGuestBoot, waitForAcks } from '../guest/test-guest.ts';
import { verifyDisks } from '../guest/verify.ts';
import { agentQemuTlsDir } from '../qemu/tls-creds.ts';
import type { MigrationReport, StorageIo } from '../migration/phases.ts';
import { followMigration } from './progress.ts';
import { startPostgres, type TestPostgres } from '../demo/postgres.ts';
import { startCeph, type TestCeph } from '../demo/ceph.ts';
import { createImage } from '../storage/rbd.ts';
import type { DiskSpec } from '../qemu/spec.ts';
import type { CreateVmRequest } from '../api/agent-types.ts';
import type { ControllerClient } from '../controller/client.ts';
import { setTimeout as sleep } from 'node:timers/promises';
import { renderReport } from './render.ts';

type VmCreateDisk = CreateVmRequest['disks'][number];

const vmName = 'demo';
/** The guests' segment: a /24 that exists only inside the demo's namespaces. */
const guestSubnet = '10.213.8';
const streamPort = 7000;
/** The shared disk's volume (or RBD image) and its size. */
const sharedVolume = 'demo-data';
const sharedBytes = 128 * 1024 * 1024;

interface NetworkSummary {
  pingsSent: number;
  pingsLost: number;
  tcpIntact: boolean;
}

interface DemoSummary {
  migrations: {
    from: string;
    to: string;
    totalMs: number;
    downtimeMs: number | undefined;
    /** The guest's pause, the source's STOP to the destination's RESUME (MigrationReport.pauseMs); null when not measured. */
    pauseMs: number | null;
    ramBytes: number;
    /** `backend`: where a shared disk lives, vmferry's storage server (nbd) or Ceph (rbd); local disks have none. */
    disks: { id: string; operation: string; bytesSent: number; backend?: SharedBackend; storageIo?: StorageIo }[];
    /** When it took more than one: the sums over every attempt. */
    allAttempts?: MigrationReport['allAttempts'];
    network?: NetworkSummary;
  }[];
  /** Whether the cluster ran with its own CA: mutual TLS on every API and every data stream. */
  tls: boolean;
  /** With --ha: how many controllers shared the PostgreSQL database, and how often a standby took over. */
  controllers?: { count: number; failovers: number };
  verified: boolean;
}

type SharedBackend = 'nbd' | 'rbd';

/** Each shared disk's backend, by disk id. */
function sharedBackends(disks: DiskSpec[]): Map<string, SharedBackend> {
  return new Map(disks.flatMap((d): [string, SharedBackend][] => (d.source.kind === 'nbd' || d.source.kind === 'rbd' ? [[d.id, d.source.kind]] : [])));
}

function summarize(report: MigrationReport, network: NetworkSummary | undefined, backends: Map<string, SharedBackend>): DemoSummary['migrations'][number] {
  return {
    from: report.from,
    to: report.to,
    totalMs: report.totalMs,
    downtimeMs: report.downtimeMs,
    pauseMs: report.pauseMs ?? null,
    ramBytes: report.ram.transferredBytes,
    disks: report.disks.map((d) => {
      const backend = backends.get(d.id);
      return { id: d.id, operation: d.operation, bytesSent: d.bytesSent, ...(backend ? { backend } : {}), ...(d.storageIo ? { storageIo: d.storageIo } : {}) };
    }),
    ...(report.allAttempts && report.allAttempts.count > 1 ? { allAttempts: report.allAttempts } : {}),
    ...(network ? { network } : {}),
  };
}

/** The demo's work, loaded only when `vmferry demo` runs: it brings every daemon's code with it. */
export async function runDemoCommand(opts: { loopback?: boolean; insecure?: boolean; ha?: boolean; storage?: 'nbd' | 'ceph' }, json: boolean): Promise<void> {
  const say = (line: string): void => {
    if (!json) console.log(line);
  };
  const logger = pino({ level: process.env.VMFERRY_LOG ?? 'silent' }, pino.destination(2));
  const workDir = await mkdtemp(join(tmpdir(), 'vmferry-demo-'));
  // Made before the agents start: they must trust the dir of the Ceph conf their QEMUs are given.
  const cephDir = opts.storage === 'ceph' ? await mkdtemp(join(tmpdir(), 'vmferry-demo-ceph-')) : undefined;
  let postgres: TestPostgres | undefined;
  let ceph: TestCeph | undefined;
  let cluster: LocalCluster | undefined;
  const tearDown = async (): Promise<void> => {
    // The cluster first: a QEMU that still has an RBD image open when Ceph goes away hangs on quit.
    await cluster?.stop();
    if (ceph) await ceph.stop();
    else if (cephDir) await rm(cephDir, { recursive: true, force: true });
    await postgres?.stop();
  };
  try {
    if (opts.ha) {
      say('Starting a throwaway PostgreSQL for two controllers…');
      postgres = await startPostgres();
    }
    say(`Starting a storage server, ${postgres ? 'two controllers' : 'a controller'} and two hosts (A, B)…`);
    cluster = await LocalCluster.start({
      workDir,
      hostIds: ['A', 'B'],
      logger,
      tls: !opts.insecure,
      ...(opts.loopback ? { namespaces: false } : { guestNetwork: { subnet: guestSubnet } }),
      ...(postgres ? { controllerProcess: true, controllers: 2, db: postgres.url, leaseTtlS: haLeaseTtlS } : {}),
      ...(cephDir ? { trustedDirs: [cephDir] } : {}),
    });
    if (cephDir) {
      say('Starting a throwaway Ceph cluster (one monitor, one OSD) for the shared disk…');
      // Where the hosts reach the root namespace: the bridge in namespaces, loopback otherwise.
      ceph = await startCeph({ dir: cephDir, address: cluster.network?.gateway ?? '127.0.0.1' });
    }
  } catch (err) {
    await tearDown();
    throw err;
  }
  const interrupted = new Promise<never>((_, reject) => {
    const onSignal = (): void => reject(new VmferryError('VMF_ABORTED', 'demo interrupted; cleaning up'));
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
  });
  interrupted.catch(() => undefined);
  try {
    await Promise.race([runDemo(cluster, say, json, postgres !== undefined, ceph), interrupted]);
  } finally {
    say(`Tearing down the cluster${ceph ? ' and Ceph' : ''}…`);
    await tearDown();
  }
}

/** The shared disk: a volume of the storage server, or with `ceph` an RBD image in its pool. */
async function createSharedDisk(cluster: LocalCluster, ceph: TestCeph | undefined): Promise<{ spec: VmCreateDisk; says: string }> {
  if (ceph) {
    await createImage(ceph.client, ceph.pool, sharedVolume, sharedBytes);
    return {
      spec: { id: 'data', rbd: { pool: ceph.pool, image: sharedVolume, ...ceph.client } },
      says: `shared disk data (Ceph RBD image ${ceph.pool}/${sharedVolume}, 128 MiB)`,
    };
  }
  await cluster.storage.volumes.create(sharedVolume, sharedBytes);
  return { spec: { id: 'data', shared: { server: { type: 'inet', ...cluster.storageNbd }, export: sharedVolume } }, says: `shared disk data (volume ${sharedVolume}, 128 MiB)` };
}

async function runDemo(cluster: LocalCluster, say: (line: string) => void, json: boolean, ha: boolean, ceph: TestCeph | undefined): Promise<void> {
  const api = cluster.api;
  const [a, b] = [cluster.host('A'), cluster.host('B')];
  say(`  host A at ${a.address}${a.namespace ? ` (namespace ${a.namespace})` : ''}, host B at ${b.address}${b.namespace ? ` (namespace ${b.namespace})` : ''}`);
  say(`  storage server NBD at ${cluster.storageNbd.host}:${cluster.storageNbd.port}, ${ha ? `controllers at ${cluster.controllerUrls.join(' and ')} (the first leads)` : `controller at ${cluster.controllerUrl}`}`);
  if (ceph) say(`  Ceph monitor at ${ceph.monitor.host}:${ceph.monitor.port} (conf ${ceph.client.conf}, pool ${ceph.pool}): the shared disk is on Ceph RBD, reached by each host's QEMU through librbd`);
  say(
    cluster.pki
      ? `  TLS everywhere, with a throwaway CA in ${cluster.pki.dir}: every API call, the RAM stream, the disk mirror and ${ceph ? 'the storage server\'s volumes go over mutual TLS; the RBD disk goes over Ceph\'s own protocol, authenticated by cephx' : 'the shared disk go over mutual TLS'}`
      : '  INSECURE (--insecure): no TLS and no authentication on any port',
  );
  for (const host of await api.hosts()) say(`  host ${host.id} runs guests under ${host.accelerator?.toUpperCase() ?? 'an unreported accelerator'}: ${host.acceleratorReason ?? ''}`);

  const segment = cluster.guestSegment;
  const vmAddress = segment ? `${segment.subnet}.10` : undefined;
  const shared = await createSharedDisk(cluster, ceph);
  await api.createVm('A', {
    name: vmName,
    memoryMiB: 256,
    ...testGuestBoot({ spanMiB: 16, dirtyMiB: 64, dirtyRateMiBs: 16, ...(vmAddress ? { ip: `${vmAddress}/24`, streamPort } : {}) }),
    disks: [
      { id: 'root', local: { sizeBytes: 512 * 1024 * 1024 } },
      shared.spec,
    ],
    ...(segment ? { nics: [{ bridge: segment.bridge }] } : {}),
  });
  say(`Created VM ${vmName} on A: local disk root (512 MiB, in A's pool), ${shared.says}${segment ? `, a NIC on bridge ${segment.bridge} at ${vmAddress}` : ''}.`);
  await api.startVm(vmName);
  const logs = [join(a.dataDir, 'vms', vmName, 'serial1.log'), join(b.dataDir, 'vms', vmName, 'serial1.log')];
  const disks = ['root', 'data'];
  let acks = (await waitForAcks(logs, disks, { atLeast: 50, timeoutMs: 90_000 })).acks;
  say(`The guest is writing: ${[...acks].map(([d, k]) => `${d} at record ${k}`).join(', ')}.`);
  const stream = segment && vmAddress ? await StreamCheck.connect(segment.clientNamespace, vmAddress, streamPort) : undefined;
  if (segment && stream) say(`A client (namespace ${segment.clientNamespace}, ${segment.clientAddress}) pings ${vmAddress} every 10 ms and reads its numbered TCP stream on port ${streamPort}.`);

  const reports: MigrationReport[] = [];
  let failovers = 0;
  const networks: (NetworkSummary | undefined)[] = [];
  try {
    for (const to of ['B', 'A']) {
      say(`\nMigrating ${vmName} to ${to} while it writes…`);
      stream?.mark();
      const pinger = segment && vmAddress ? Pinger.start(segment.clientNamespace, vmAddress) : undefined;
      let report: MigrationReport;
      try {
        // Under TCG (as here) QEMU 7.2 can lose a busy guest's writes in pre-copy; after two refusals the
        // last attempt stops the guest for its RAM pass instead of giving up (docs/QEMU-TCG-PRECOPY.md).
        const started = await api.migrate({ vm: vmName, to, fallback: 'stop-and-copy' });
        if (ha && failovers === 0) {
          await killLeaderDuring(cluster, api, started.id as string, say);
          failovers++;
        }
        report = await followMigration(api, started.id as string, json ? 'silent' : 'plain');
        if (ha && reports.length === 0) {
          const leader = await cluster.leadership(1);
          say(`  controller ${leader.self ?? '2'} (epoch ${leader.epoch ?? '?'}) ${report.outcome === 'completed' ? 'finished the migration' : `settled the migration: ${report.recovery ?? report.outcome}`}`);
          if (report.outcome === 'failed') {
            // Killed before any resume was sent: the new leader rolled it back, as the rules say; the guest kept running on A.
            say(`Migrating ${vmName} to ${to} again, under controller ${leader.self ?? '2'}…`);
            const again = await api.migrate({ vm: vmName, to, fallback: 'stop-and-copy' });
            report = await followMigration(api, again.id as string, json ? 'silent' : 'plain');
          }
        }
      } catch (err) {
        await pinger?.stop();
        throw err;
      }
      const pings = await pinger?.finish();
      const window = await stream?.window();
      say(renderReport(report));
      if (pings && window && stream) {
        networks.push({ pingsSent: pings.sent, pingsLost: pings.lost, tcpIntact: window.intact });
        say(
          `  network: ${pings.lost} of ${pings.sent} pings lost (≈ ${pings.lostMs} ms), ` +
            (window.intact ? `TCP connection kept, stream intact (${window.numbers} numbers, longest stall ${window.longestStallMs} ms)` : `TCP stream BROKEN: ${stream.problem ?? 'no numbers arrived'}`),
        );
      } else {
        networks.push(undefined);
      }
      if (report.outcome !== 'completed') throw new VmferryError('VMF_MIGRATION_FAILED', `migration to ${to} ${report.outcome}: ${report.error?.message ?? ''}`);
      reports.push(report);
      acks = (await waitForAcks(logs, disks, { atLeast: 20, since: acks, timeoutMs: 90_000 })).acks;
      say(`The guest keeps writing on ${to}: ${[...acks].map(([d, k]) => `${d} at record ${k}`).join(', ')}.`);
    }
  } finally {
    await stream?.close();
  }

  say('\nStopping the VM and booting the guest in verify mode on its disks…');
  const vm = await api.vm(vmName);
  await api.stopVm(vmName, true);
  const acked = (await readGuestReport(logs)).acks;
  // With the credentials of the host the VM ended on, as its QEMU had them: the storage server takes TLS only.
  const tlsDir = cluster.pki ? agentQemuTlsDir(cluster.host(vm.host).dataDir) : undefined;
  const verify = await verifyDisks(vm.spec.disks, join(cluster.workDir, 'verify'), { spanMiB: 16, ...(tlsDir === undefined ? {} : { tlsDir }) });
  const problems = checkVerify(verify, acked);
  for (const result of verify.values()) {
    say(`  ${result.disk}: acknowledged up to ${acked.get(result.disk) ?? 0}, highest intact ${result.highest}, corrupt ${result.corrupt}, missing ${result.missing}`);
  }
  say(problems.length ? `VERIFY FAILED:\n  ${problems.join('\n  ')}` : 'Every acknowledged record is intact.');
  const summary: DemoSummary = {
    migrations: reports.map((report, i) => summarize(report, networks[i], sharedBackends(vm.spec.disks))),
    tls: cluster.pki !== undefined,
    ...(ha ? { controllers: { count: cluster.controllerUrls.length, failovers } } : {}),
    verified: problems.length === 0,
  };
  if (json) process.stdout.write(`${JSON.stringify(summary)}\n`);
  if (problems.length || networks.some((n) => n && !n.tcpIntact)) process.exitCode = 1;
}

/** The lease TTL of the demo's controllers: the standby takes over within about this long of the kill. */
const haLeaseTtlS = 3;

/** Kills the leading controller (the first) once the migration has begun moving data, and waits until the standby leads. */
async function killLeaderDuring(cluster: LocalCluster, api: ControllerClient, id: string, say: (line: string) => void): Promise<void> {
  const deadline = Date.now() + 120_000;
  let phase = (await api.migration(id)).phase;
  while (phase === 'pending' && Date.now() < deadline) {
    await sleep(100);
    phase = (await api.migration(id)).phase;
  }
  const killedAt = Date.now();
  await cluster.killController(0);
  say(`  killed the leading controller ${cluster.controllerUrls[0] ?? ''} (SIGKILL) while the migration was ${phase}`);
  for (;;) {
    const status = await cluster.leadership(1).catch(() => undefined);
    if (status?.leader) {
      say(`  the standby ${status.self ?? ''} took the lease ${((Date.now() - killedAt) / 1000).toFixed(1)} s later (epoch ${status.epoch ?? '?'}) and settles what the leader left`);
      return;
    }
    if (Date.now() - killedAt > 60_000) throw new VmferryError('VMF_TIMEOUT', 'the standby controller did not take over within 60 s of the leader\'s death');
    await sleep(100);
  }
}

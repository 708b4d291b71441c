/**
 * After a chaos run has settled: where the guest really runs (whose report
 * log keeps growing, which QEMUs exist), and what is left over, compared
 * with what the controller says. Each finding is a sentence; the campaign
 * counts runs per kind of finding.
 */
import Database from 'better-sqlite3';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { AgentClient } from '../../src/agent/client.ts';
import type { MigrationHalves } from '../../src/api/agent-types.ts';
import type { LocalCluster } from '../../src/demo/local-cluster.ts';
import { readGuestReport } from '../../src/guest/test-guest.ts';
import { requestJson } from '../../src/http/errors.ts';
import { isTapOf } from '../../src/qemu/taps.ts';
import type { Volume } from '../../src/storage/volumes.ts';
import { runProgram } from '../../src/util/run.ts';
import type { FaultCluster } from '../support/fault-cluster.ts';

export const findingKinds = ['doubleRunning', 'noneRunning', 'lostAcked', 'leftovers', 'misreported', 'unresolved'] as const;
export type FindingKind = (typeof findingKinds)[number];
export type Findings = Partial<Record<FindingKind, string[]>>;

export function addFinding(findings: Findings, kind: FindingKind, text: string): void {
  (findings[kind] ??= []).push(text);
}

/** Acks per host, from each host's own report log. */
async function acksByHost(faults: FaultCluster, vm: string): Promise<number[]> {
  const logs = faults.reportLogs(vm);
  const reports = await Promise.all(logs.map((log) => readGuestReport([log])));
  return reports.map((r) => [...r.acks.values()].reduce((a, b) => a + b, 0));
}

/**
 * Hosts whose guest acknowledges new writes: watched for at least minMs,
 * and up to maxMs while none does (a guest whose shared disk is reconnecting
 * stalls for a while).
 */
export async function writingHosts(faults: FaultCluster, vm: string, minMs = 2_000, maxMs = 12_000): Promise<string[]> {
  const ids = faults.cluster.hosts.map((h) => h.id);
  const before = await acksByHost(faults, vm);
  const started = Date.now();
  for (;;) {
    await sleep(500);
    const now = await acksByHost(faults, vm);
    const growing = ids.filter((_, i) => (now[i] ?? 0) > (before[i] ?? 0));
    const elapsed = Date.now() - started;
    if ((growing.length > 0 && elapsed >= minMs) || elapsed >= maxMs) return growing;
  }
}

/** The writer token a QEMU uses for volume `volume` (after the @ in its export name), if any. */
async function qemuToken(pid: number, volume: string): Promise<string | undefined> {
  const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  const escaped = volume.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return new RegExp(`${escaped}@([A-Za-z0-9._:-]+)`).exec(cmdline)?.[1];
}

/** Pids of processes listening on TCP in a host's namespace (an NBD export or a migration listener of QEMU). */
async function listeningPids(cluster: LocalCluster, hostId: string): Promise<number[]> {
  const namespace = cluster.host(hostId).namespace;
  if (!namespace) return [];
  const out = await runProgram('ip', ['netns', 'exec', namespace, 'ss', '-ltnpH'], { timeoutMs: 10_000 }).catch(() => '');
  return [...out.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1]));
}

/** The taps of VM `vm` in a host's namespace (src/qemu/taps.ts names them). */
async function tapsOn(cluster: LocalCluster, hostId: string, vm: string): Promise<string[]> {
  const namespace = cluster.host(hostId).namespace;
  if (!namespace) return [];
  const out = await runProgram('ip', ['-n', namespace, '-j', 'link', 'show'], { timeoutMs: 10_000 }).catch(() => '[]');
  return (JSON.parse(out) as { ifname: string }[]).map((l) => l.ifname).filter((name) => isTapOf(vm, name));
}

export interface Reality {
  /** The host whose guest writes, when exactly one does. */
  live: string | undefined;
  writing: string[];
  pids: Map<string, number[]>;
}

/** What runs where, with doubleRunning found on the way. */
export async function observe(faults: FaultCluster, vm: string, findings: Findings): Promise<Reality> {
  const writing = await writingHosts(faults, vm);
  const pids = await faults.qemuPids(vm);
  if (writing.length > 1) addFinding(findings, 'doubleRunning', `guests on ${writing.join(' and ')} both acknowledge new writes`);
  const withQemu = [...pids].filter(([, list]) => list.length > 0).map(([id]) => id);
  if (writing.length <= 1 && withQemu.length > 1) {
    // Two QEMUs of which at most one writes: a second guest that runs (the agent says so) but is stalled still counts.
    const running: string[] = [];
    for (const id of withQemu) {
      const state = await new AgentClient(faults.cluster.host(id).agentUrl).getVm(vm).then((info) => info.state, () => 'unknown');
      if (state === 'running') running.push(id);
    }
    if (running.length > 1) addFinding(findings, 'doubleRunning', `QEMUs of ${vm} on ${withQemu.join(' and ')}, the agents of ${running.join(' and ')} say running`);
  }
  return { live: writing.length === 1 ? writing[0] : undefined, writing, pids };
}

/**
 * What an agent holds of a migration, waiting a while for it to let go: the controller retires a
 * completed migration's source in the background, retrying while that agent is away, so a host
 * that just came back may still be retiring it (chaos seed 91642 run 44).
 */
async function halvesOnceSettled(agentUrl: string, migrationId: string): Promise<MigrationHalves | { error: string }> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const halves = await new AgentClient(agentUrl).migrationHalves(migrationId).catch((err: unknown) => ({ error: String(err) }));
    if (('source' in halves && !halves.source && !halves.destination) || Date.now() > deadline) return halves;
    await sleep(500);
  }
}

/** Everything of the VM and the migration that should be gone once the guest lives on `live` only. */
export async function checkLeftovers(faults: FaultCluster, vm: string, migrationId: string, reality: Reality & { live: string }, findings: Findings): Promise<void> {
  const { cluster } = faults;
  const livePids = reality.pids.get(reality.live) ?? [];
  if (livePids.length > 1) addFinding(findings, 'leftovers', `${livePids.length} QEMUs of ${vm} on ${reality.live}`);
  for (const host of cluster.hosts) {
    const pids = reality.pids.get(host.id) ?? [];
    const listening = new Set(await listeningPids(cluster, host.id));
    const exporting = pids.filter((pid) => listening.has(pid));
    if (exporting.length) addFinding(findings, 'leftovers', `QEMU ${exporting.join(', ')} of ${vm} on ${host.id} still listens (NBD export or migration)`);
    const halves = await halvesOnceSettled(host.agentUrl, migrationId);
    if (!('source' in halves) || halves.source || halves.destination) addFinding(findings, 'leftovers', `${host.id}'s agent still holds a half of migration ${migrationId}: ${JSON.stringify(halves)}`);
    if (host.id === reality.live) {
      const jobs = await new AgentClient(host.agentUrl).getVm(vm).then((info) => info.blockJobs, (err: unknown) => [`(unreadable: ${String(err)})`]);
      if (jobs.length) addFinding(findings, 'leftovers', `block jobs left in ${vm}'s QEMU on ${host.id}: ${jobs.join(', ')}`);
      continue;
    }
    if (pids.length) addFinding(findings, 'leftovers', `QEMU ${pids.join(', ')} of ${vm} left on ${host.id}`);
    const taps = await tapsOn(cluster, host.id, vm);
    if (taps.length) addFinding(findings, 'leftovers', `taps of ${vm} left on ${host.id}: ${taps.join(', ')}`);
    const pool = await readdir(join(host.dataDir, 'pool')).catch((): string[] => []);
    const files = pool.filter((f) => f.startsWith(`${vm}-`));
    if (files.length) addFinding(findings, 'leftovers', `pool files of ${vm} left on ${host.id}: ${files.join(', ')}`);
    const vms = await readdir(join(host.dataDir, 'vms')).catch((): string[] => []);
    if (vms.includes(vm)) addFinding(findings, 'leftovers', `VM directory of ${vm} left on ${host.id}`);
  }
  const volumeName = `${vm}-data`;
  const volume = await requestJson<Volume>(cluster.storageAdminUrl, 'GET', `/v1/volumes/${volumeName}`).catch(() => undefined);
  if (!volume) {
    addFinding(findings, 'leftovers', `volume ${volumeName} cannot be read from the storage server`);
    return;
  }
  const token = livePids[0] === undefined ? undefined : await qemuToken(livePids[0], volumeName);
  // The API names clients by address only: the one running QEMU is the only client there may be.
  if (volume.attachments.length > (token === undefined ? 0 : 1)) addFinding(findings, 'leftovers', `${volume.attachments.length} clients attached to ${volumeName}, one QEMU runs: ${volume.attachments.join(', ')}`);
  // Tokens are never listed by the API (a token lets its bearer write): the harness reads the server's catalog itself.
  const holder = leaseHolder(join(cluster.workDir, 'storage', 'catalog.db'), volumeName);
  if (holder !== undefined && holder !== token) addFinding(findings, 'leftovers', `writer lease of ${volumeName} held by ${holder || '(released)'}, the running QEMU uses ${token ?? 'no token'}`);
}

/** The writer lease's holder as the storage server stored it ('' once released), or undefined when none was granted. */
function leaseHolder(catalog: string, volume: string): string | undefined {
  const db = new Database(catalog, { readonly: true, fileMustExist: true });
  try {
    return (db.prepare('SELECT holder FROM writer_leases WHERE volume = ?').get(volume) as { holder: string } | undefined)?.holder;
  } finally {
    db.close();
  }
}

/** What the controller says about the VM and the migration, against where the guest runs. */
export async function checkReported(faults: FaultCluster, vm: string, phase: string, live: string, findings: Findings): Promise<void> {
  const info = await faults.cluster.api.vm(vm).catch((err: unknown) => err as Error);
  if (info instanceof Error) {
    addFinding(findings, 'misreported', `the controller cannot show ${vm}: ${info.message}`);
    return;
  }
  if (info.host !== live) addFinding(findings, 'misreported', `the controller places ${vm} on ${info.host}, its guest runs on ${live}`);
  if (info.state !== 'running') addFinding(findings, 'misreported', `the controller says ${vm} is ${info.state}, its guest runs on ${live}`);
  if (info.migrating) addFinding(findings, 'misreported', `the controller says ${vm} is still migrating`);
  const listed = await faults.cluster.api.vms().then((vms) => vms.filter((v) => v.name === vm).map((v) => `${v.host} (${v.state})`), (err: unknown) => [`error: ${String(err)}`]);
  if (listed.length !== 1 || !listed[0]?.startsWith(`${live} `)) addFinding(findings, 'misreported', `vm list shows ${vm} as ${listed.join(', ') || 'nowhere'}, its guest runs on ${live}`);
  const expected = phase === 'completed' ? 'B' : phase === 'failed' || phase === 'cancelled' ? 'A' : undefined;
  if (expected && expected !== live) addFinding(findings, 'misreported', `the migration is "${phase}" but the guest runs on ${live}`);
}

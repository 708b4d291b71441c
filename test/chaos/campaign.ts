/**
 * The seeded chaos campaign: on one LocalCluster (two hosts in network
 * namespaces, controller and storage server as their own processes, a fault
 * proxy in front of each agent), each run migrates a fresh VM A → B under
 * guest writes, injects the one fault drawn for it at a moment of a phase,
 * restarts what the fault killed, waits for the migration to settle, and
 * checks what a user relies on (checks.ts). The cluster is reused across
 * runs and rebuilt only when a run could not clean up after itself.
 */
import { readdir, readFile, readlink, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { AgentClient } from '../../src/agent/client.ts';
import type { VmInfo } from '../../src/api/agent-types.ts';
import { LocalCluster } from '../../src/demo/local-cluster.ts';
import { describeError } from '../../src/errors.ts';
import { checkVerify, readGuestReport, waitForAcks } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import type { MigrationRecord } from '../../src/store/store.ts';
import { FaultCluster } from '../support/fault-cluster.ts';
import { addFinding, checkLeftovers, checkReported, findingKinds, observe, type FindingKind, type Findings } from './checks.ts';
import { drawRun, faultHost, type FaultKind, type RunDraw } from './draw.ts';
import { FaultProxy } from './fault-proxy.ts';
import { PowerLoss, killAndWait, pidsUnder } from './power-loss.ts';

const spanMiB = 8;
const guest = { intervalMs: 0, bulkMiBs: 2, dirtyMiB: 8, dirtyRateMiBs: 2 };
const sizes = { rootMiB: 32, dataMiB: 32, memoryMiB: 128 };
/** The order phases come in; anything else (failed, rolling-back, unresolved…) is past every target. */
const phaseOrder = ['pending', 'preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'resume-sent', 'resumed', 'source-retired', 'completed'];
const finalPhases = ['completed', 'cancelled', 'failed'];
/** From the fault to a final phase, however slow the recovery (a late reply alone can hold 62 s). */
const settleTimeoutMs = 240_000;
/** An unresolved migration that vmferry leaves to an operator (no-return.ts, cannotTell): no grace makes it settle by itself. */
function operatorDecides(record: MigrationRecord): boolean {
  return record.phase === 'unresolved' && /cannot tell whether the guest ran there/.test(record.report?.error?.message ?? '');
}

/** How much longer an 'unresolved' migration gets, once every host is back, to resolve itself. */
const unresolvedGraceMs = 90_000;

export interface RunResult {
  run: number;
  seed: number;
  kind: FaultKind;
  /** The phase aimed at, and the one the migration was in when the fault hit. */
  phase: string;
  hitIn: string;
  delayMs: number;
  outageMs: number;
  note: string;
  /** The migration's last phase ('unresolved' or a stuck phase when it never settled). */
  outcome: string;
  findings: Findings;
  /** The harness itself failed (the run proves nothing either way). */
  error?: string;
  seconds: number;
  /** Seconds spent in each stage (start, fault, settle, check, clean), to see where a run's time goes. */
  stages: Record<string, number>;
}

export interface CampaignSummary {
  runs: number;
  seed: number;
  faults: Record<string, number>;
  doubleRunning: number;
  noneRunning: number;
  lostAcked: number;
  leftovers: number;
  misreported: number;
  unresolved: number;
}

export function summarize(seed: number, results: RunResult[]): CampaignSummary {
  const faults: Record<string, number> = {};
  for (const r of results) faults[r.kind] = (faults[r.kind] ?? 0) + 1;
  const count = (kind: FindingKind): number => results.filter((r) => (r.findings[kind]?.length ?? 0) > 0).length;
  return {
    runs: results.length,
    seed,
    faults,
    doubleRunning: count('doubleRunning'),
    noneRunning: count('noneRunning'),
    lostAcked: count('lostAcked'),
    leftovers: count('leftovers'),
    misreported: count('misreported'),
    unresolved: count('unresolved'),
  };
}

export function hasFindings(summary: CampaignSummary): boolean {
  return findingKinds.some((kind) => summary[kind] > 0);
}

export interface CampaignOptions {
  workDir: string;
  logger: Logger;
  /** Network namespace names and subnets, distinct from any other cluster running at the same time. */
  network: { prefix: string; subnet: string; hostLinkSubnet: string };
  /** Called as each run ends (progress). */
  onRun?: (result: RunResult) => void;
}

export class ChaosCampaign {
  readonly #options: CampaignOptions;
  readonly #powerLoss: PowerLoss;
  #cluster: LocalCluster | undefined;
  #faults: FaultCluster | undefined;
  readonly #proxies = new Map<string, FaultProxy>();

  private constructor(options: CampaignOptions, powerLoss: PowerLoss) {
    this.#options = options;
    this.#powerLoss = powerLoss;
  }

  static async create(options: CampaignOptions): Promise<ChaosCampaign> {
    return new ChaosCampaign(options, await PowerLoss.load());
  }

  get dropsUnsyncedWrites(): boolean {
    return this.#powerLoss.dropsUnsyncedWrites;
  }

  /** Runs `runs` (numbers of runs, each drawn from seed and its number) one after the other. */
  async run(seed: number, runs: number[], kinds?: readonly FaultKind[]): Promise<RunResult[]> {
    const results: RunResult[] = [];
    for (const run of runs) {
      const result = await this.#runOne(drawRun(seed, run, kinds), seed);
      results.push(result);
      this.#options.onRun?.(result);
    }
    return results;
  }

  async close(): Promise<void> {
    await this.#teardown();
  }

  async #teardown(): Promise<void> {
    await this.#cluster?.network?.setHostLink(true).catch(() => undefined);
    await this.#cluster?.stop().catch((err: unknown) => this.#options.logger.warn({ err: describeError(err) }, 'stopping the chaos cluster'));
    this.#cluster = undefined;
    this.#faults = undefined;
    for (const proxy of this.#proxies.values()) await proxy.close();
    this.#proxies.clear();
  }

  async #ensureCluster(): Promise<FaultCluster> {
    if (this.#faults) return this.#faults;
    const workDir = join(this.#options.workDir, 'cluster');
    this.#cluster = await LocalCluster.start({
      workDir,
      hostIds: ['A', 'B'],
      logger: this.#options.logger,
      namespaces: true,
      network: this.#options.network,
      controllerProcess: true,
      storageProcess: true,
      abandonAfterS: 10,
      // The campaign restarts agents mid-migration: a KVM probe at each start (3 s where KVM hangs, as here) would only shift its timing.
      accel: 'tcg',
      agentFront: async ({ id, agentUrl, gateway }) => {
        const proxy = await FaultProxy.start(agentUrl, gateway);
        this.#proxies.set(id, proxy);
        return proxy.url;
      },
      agentEnv: (host) => this.#powerLoss.agentEnv(host.dataDir),
    });
    this.#faults = new FaultCluster(this.#cluster, this.#options.workDir);
    return this.#faults;
  }

  async #runOne(draw: RunDraw, seed: number): Promise<RunResult> {
    const started = Date.now();
    const result: RunResult = { run: draw.run, seed, kind: draw.kind, phase: draw.phase, hitIn: '-', delayMs: draw.delayMs, outageMs: draw.outageMs, note: '', outcome: '-', findings: {}, seconds: 0, stages: {} };
    let stageStart = started;
    const stage = (name: string): void => {
      result.stages[name] = Math.round((Date.now() - stageStart) / 100) / 10;
      stageStart = Date.now();
    };
    const vm = `cx${draw.run}`;
    let clean = false;
    try {
      const faults = await this.#ensureCluster();
      await faults.startVm(vm, guest, sizes.rootMiB, sizes);
      stage('start');
      if (draw.reply) this.#proxies.get(draw.reply.host)?.arm(draw.reply);
      const id = await startMigration(faults.cluster, vm, result);
      const hit = await this.#inject(faults, draw, vm, id);
      result.hitIn = hit.phase;
      result.note += hit.note;
      stage('fault');
      await this.#check(faults, vm, id, hit.guestMayDieOn, result, stage);
      clean = await this.#cleanUp(faults, vm);
      stage('clean');
    } catch (err) {
      // A host that does not come back is the run's finding (an operator must step in), not the harness's failure.
      if (err instanceof HostDown) addFinding(result.findings, 'unresolved', err.message);
      else result.error = describeError(err);
    } finally {
      for (const proxy of this.#proxies.values()) proxy.disarm();
      if (!clean) await this.#teardown();
      result.seconds = (Date.now() - started) / 1000;
    }
    return result;
  }

  /** Waits for the drawn moment, injects the fault, and restarts what it killed. */
  async #inject(faults: FaultCluster, draw: RunDraw, vm: string, id: string): Promise<{ phase: string; note: string; guestMayDieOn: string | undefined }> {
    const { cluster } = faults;
    if (draw.reply) {
      const proxy = this.#proxies.get(draw.reply.host) as FaultProxy;
      const phase = await pollUntil(cluster, id, () => proxy.fired !== undefined);
      const fired = proxy.fired ? `${draw.reply.mode === 'lost' ? 'lost' : `delayed ${draw.reply.delayMs} ms`} the reply to ${draw.reply.route}` : `${draw.reply.route} was never called`;
      return { phase, note: fired, guestMayDieOn: undefined };
    }
    const target = phaseOrder.indexOf(draw.phase);
    await pollUntil(cluster, id, (phase) => order(phase) >= target);
    await sleep(draw.delayMs);
    const phase = (await cluster.api.migration(id)).phase;
    const host = faultHost(draw.kind);
    switch (draw.kind) {
      case 'kill-agent-a':
      case 'kill-agent-b':
        await cluster.killAgent(host as string);
        await sleep(draw.outageMs);
        await restartAgent(cluster, host as string);
        return { phase, note: `agent ${host} down ${draw.outageMs} ms`, guestMayDieOn: undefined };
      case 'kill-controller':
        await cluster.killController();
        await sleep(draw.outageMs);
        await cluster.startController();
        return { phase, note: `controller down ${draw.outageMs} ms`, guestMayDieOn: undefined };
      case 'kill-storage':
        await cluster.killStorage();
        await sleep(draw.outageMs);
        await cluster.startStorage();
        return { phase, note: `storage server down ${draw.outageMs} ms`, guestMayDieOn: undefined };
      case 'kill-qemu-a':
      case 'kill-qemu-b': {
        const pids = (await faults.qemuPids(vm)).get(host as string) ?? [];
        await killAndWait(pids);
        return { phase, note: pids.length ? `killed QEMU ${pids.join(', ')} on ${host}` : `no QEMU of ${vm} on ${host} to kill`, guestMayDieOn: pids.length ? host : undefined };
      }
      case 'cancel': {
        const answer = await cluster.api.cancel(id).then((r) => `cancel answered: ${r.phase}`, (err: unknown) => `cancel refused: ${describeError(err)}`);
        return { phase, note: answer, guestMayDieOn: undefined };
      }
      case 'cut-link':
        await cluster.network?.setHostLink(false);
        try {
          await sleep(draw.outageMs);
        } finally {
          await cluster.network?.setHostLink(true);
        }
        return { phase, note: `link cut ${draw.outageMs} ms`, guestMayDieOn: undefined };
      case 'power-loss-a':
      case 'power-loss-b': {
        const hadQemu = (await pidsUnder(cluster.host(host as string).dataDir)).length > 0;
        const what = await this.#powerLoss.cut(cluster, host as string);
        await sleep(draw.outageMs);
        await restartAgent(cluster, host as string);
        return { phase, note: `power loss of ${host} for ${draw.outageMs} ms: ${what}`, guestMayDieOn: hadQemu ? host : undefined };
      }
      case 'lost-reply':
      case 'late-reply':
        throw new Error(`${draw.kind} drawn without a route`);
    }
  }

  /** Waits for the migration to settle, then counts findings into result. */
  async #check(faults: FaultCluster, vm: string, id: string, guestMayDieOn: string | undefined, result: RunResult, stage: (name: string) => void): Promise<void> {
    const { cluster } = faults;
    const findings = result.findings;
    let record = await this.#settle(faults, id);
    if (operatorDecides(record)) {
      // vmferry cannot tell whether the guest ran on the destination, and leaves it to a person: the harness acts as
      // one, choosing the destination, the choice that loses no acknowledged write (the guest restarts there from its disks).
      await cluster.waitForHosts(['A', 'B'], 30_000);
      record = await cluster.api.resolve(id, record.to);
      result.note += `; an operator resolved it: --run-on ${record.to}`;
    }
    result.outcome = record.phase;
    // What vmferry said went wrong, for reading a finding later (a rollback problem, say).
    if (record.report?.error) result.note += `; reported: ${record.report.error.message}`;
    const settled = finalPhases.includes(record.phase);
    if (!settled) addFinding(findings, 'unresolved', `migration ${id} still "${record.phase}"${record.report?.error ? `: ${record.report.error.message}` : ''}`);
    await cluster.waitForHosts(['A', 'B'], 30_000);
    stage('settle');

    let reality = await observe(faults, vm, findings);
    let verified = false;
    if (reality.writing.length === 0 && settled) {
      const placed = await cluster.api.vm(vm).catch(() => undefined);
      if (guestMayDieOn && placed?.host === guestMayDieOn) {
        // The fault killed the guest where it lives: check its disks at rest, then start it there, as an operator would.
        await this.#verify(faults, vm, placed, findings);
        verified = true;
        const restarted = await cluster.api.startVm(vm).then(
          () => waitForAcks([faults.reportLogs(vm)[cluster.hosts.findIndex((h) => h.id === placed.host)] as string], ['root', 'data'], { atLeast: 5, timeoutMs: 90_000 }).then(() => ''),
          (err: unknown) => describeError(err),
        ).catch((err: unknown) => describeError(err));
        if (restarted) addFinding(findings, 'noneRunning', `${vm} could not be started again on ${placed.host} after the fault killed it: ${restarted}`);
        result.note += `; guest restarted on ${placed.host}`;
        reality = await observe(faults, vm, findings);
      } else {
        addFinding(findings, 'noneRunning', `no guest of ${vm} writes after the migration ended "${record.phase}" (QEMUs: ${JSON.stringify(Object.fromEntries(reality.pids))})`);
      }
    }
    if (reality.live) {
      await checkLeftovers(faults, vm, id, { ...reality, live: reality.live }, findings);
      await checkReported(faults, vm, record.phase, reality.live, findings);
    }
    stage('check');
    if (!verified) await this.#verify(faults, vm, await this.#whereItLives(faults, vm, reality.live), findings);
    stage('verify');
  }

  async #settle(faults: FaultCluster, id: string): Promise<MigrationRecord> {
    const deadline = Date.now() + settleTimeoutMs;
    let unresolvedUntil: number | undefined;
    for (;;) {
      const record = await faults.cluster.api.migration(id).catch(() => undefined);
      if (record && finalPhases.includes(record.phase)) return record;
      if (record && operatorDecides(record)) return record;
      if ((record?.phase as string | undefined) === 'unresolved') unresolvedUntil ??= Date.now() + unresolvedGraceMs;
      if (record && (Date.now() > deadline || (unresolvedUntil !== undefined && Date.now() > unresolvedUntil))) return record;
      if (!record && Date.now() > deadline) throw new Error(`the controller does not show migration ${id}`);
      await sleep(250);
    }
  }

  /** The VM as the agent of the host its guest runs on sees it, else as the controller does, else any agent that has it. */
  async #whereItLives(faults: FaultCluster, vm: string, live: string | undefined): Promise<VmInfo | undefined> {
    const { cluster } = faults;
    if (live) {
      const info = await new AgentClient(cluster.host(live).agentUrl).getVm(vm).catch(() => undefined);
      if (info) return info;
    }
    const placed = await cluster.api.vm(vm).catch(() => undefined);
    if (placed) return placed;
    for (const host of cluster.hosts) {
      const info = await new AgentClient(host.agentUrl).getVm(vm).catch(() => undefined);
      if (info) return info;
    }
    return undefined;
  }

  /** Stops every QEMU of the VM and boots verify mode on its disks: every acknowledged record must be there. */
  async #verify(faults: FaultCluster, vm: string, info: VmInfo | undefined, findings: Findings): Promise<void> {
    if (!info) {
      addFinding(findings, 'lostAcked', `no host has ${vm} any more: its local disk cannot be verified`);
      return;
    }
    await faults.cluster.api.stopVm(vm, true).catch(() => undefined);
    await killAndWait([...(await faults.qemuPids(vm)).values()].flat());
    const report = await readGuestReport(faults.reportLogs(vm));
    const dir = join(this.#options.workDir, `verify-${vm}`);
    try {
      const verify = await verifyDisks(info.spec.disks, dir, { spanMiB, timeoutMs: 90_000 });
      for (const problem of checkVerify(verify, report.acks)) addFinding(findings, 'lostAcked', problem);
    } catch (err) {
      const files = info.spec.disks.flatMap((d) => (d.source.kind === 'file' ? [d.source.path] : []));
      addFinding(findings, 'lostAcked', `verify boot on ${info.host}'s disks failed: ${describeError(err)}${await holders(files)}`);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  /** Removes the VM and its volume; false when something is left (the next run gets a new cluster). */
  async #cleanUp(faults: FaultCluster, vm: string): Promise<boolean> {
    const { cluster } = faults;
    await cluster.api.stopVm(vm, true).catch(() => undefined);
    await cluster.api.deleteVm(vm).catch(() => undefined);
    for (const host of cluster.hosts) {
      const agent = new AgentClient(host.agentUrl);
      if (!(await agent.getVm(vm).then(() => true, () => false))) continue;
      await agent.stopVm(vm, true).catch(() => undefined);
      await agent.deleteVm(vm).catch(() => undefined);
    }
    await killAndWait([...(await faults.qemuPids(vm)).values()].flat());
    let removed = false;
    for (let attempt = 0; attempt < 10 && !removed; attempt++) {
      removed = await cluster.removeVolume(`${vm}-data`, { force: true }).then(() => true, () => false);
      if (!removed) await sleep(500);
    }
    // What the agents did not remove (the run has counted it already) must not fill the disk over a long campaign.
    for (const host of cluster.hosts) {
      await rm(join(host.dataDir, 'vms', vm), { recursive: true, force: true });
      for (const file of await readdir(join(host.dataDir, 'pool')).catch((): string[] => [])) {
        if (file.startsWith(`${vm}-`)) await rm(join(host.dataDir, 'pool', file), { force: true });
      }
    }
    const pids = [...(await faults.qemuPids(vm)).values()].flat();
    const reachable = await cluster.api.hosts().then((hosts) => hosts.filter((h) => h.state === 'reachable').length === 2, () => false);
    return removed && pids.length === 0 && reachable;
  }
}

/** Who still has these files open (a QEMU the harness did not know of, say), for the finding's text. */
async function holders(files: string[]): Promise<string> {
  const found: string[] = [];
  for (const pid of (await readdir('/proc')).filter((e) => /^\d+$/.test(e))) {
    const fds = await readdir(`/proc/${pid}/fd`).catch((): string[] => []);
    for (const fd of fds) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      if (!files.includes(target)) continue;
      const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).replaceAll('\0', ' ');
      found.push(`pid ${pid} (${cmdline.slice(0, 160)})`);
      break;
    }
  }
  return found.length ? `; held open by ${found.join(', ')}` : '';
}

function order(phase: string): number {
  const index = phaseOrder.indexOf(phase);
  return index < 0 ? phaseOrder.length : index;
}

class HostDown extends Error {}

async function restartAgent(cluster: LocalCluster, id: string): Promise<void> {
  try {
    await cluster.startAgent(id);
  } catch (err) {
    throw new HostDown(`host ${id}'s agent does not start again after the fault: ${describeError(err)}`);
  }
}

/**
 * Asks the controller to migrate `vm` to B. A refusal is an outcome, not a
 * harness failure (a lost reply to the source's begin makes one): the record
 * the controller made anyway, if any, is the one the run follows.
 */
async function startMigration(cluster: LocalCluster, vm: string, result: RunResult): Promise<string> {
  try {
    // Uncapped: a capped TCG pre-copy takes more passes and fails its memory comparison (docs/QEMU-TCG-PRECOPY.md), so switch-over would rarely be reached.
    const { id } = await cluster.api.migrate({ vm, to: 'B', deadlineS: 120, stallTimeoutS: 10 });
    if (id) return id;
    throw new Error('the controller accepted the migration without an id');
  } catch (err) {
    const records = (await cluster.api.migrations()).filter((m) => m.vm === vm).sort((a, b) => b.createdAt - a.createdAt);
    if (!records[0]) throw err;
    result.note = `migrate refused: ${describeError(err)}; `;
    return records[0].id;
  }
}

/** Polls the migration's phase (every 25 ms, for at most 3 minutes) until `done`, or until it ended; returns the phase then. */
async function pollUntil(cluster: LocalCluster, id: string, done: (phase: string) => boolean): Promise<string> {
  const deadline = Date.now() + 180_000;
  for (;;) {
    const phase: string = (await cluster.api.migration(id)).phase;
    if (done(phase) || finalPhases.includes(phase) || phase === 'unresolved' || Date.now() > deadline) return phase;
    await sleep(25);
  }
}

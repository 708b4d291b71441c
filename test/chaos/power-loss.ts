/**
 * A host's power loss: every process of the host dies with SIGKILL (its agent
 * and its QEMUs), then whatever the agent wrote but did not fsync is lost.
 *
 * The second half is test/support/power-loss/ (a preload that journals each
 * write and fsync of the agent process under a root, and dropUnsynced, which
 * reverts what was not synced). The seam: the agent runs with
 *   NODE_OPTIONS=--import=<preload>
 *   VMFERRY_POWERLOSS_JOURNAL=<journal file>
 *   VMFERRY_POWERLOSS_ROOT=<the host's data directory>
 * and after the kill the harness calls dropUnsynced(journal, root). While
 * that module is absent, a power loss is the kill alone, and each run's
 * record says so.
 */
import { existsSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { readdir, readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { LocalCluster } from '../../src/demo/local-cluster.ts';

const moduleDir = resolve(import.meta.dirname, '../support/power-loss');
const preloadPath = join(moduleDir, 'preload.ts');
const indexPath = join(moduleDir, 'index.ts');

interface PowerLossModule {
  dropUnsynced(journal: string, root: string): Promise<unknown>;
}

export class PowerLoss {
  readonly #workDir: string;
  readonly #module: PowerLossModule | undefined;

  private constructor(workDir: string, module: PowerLossModule | undefined) {
    this.#workDir = workDir;
    this.#module = module;
  }

  static async load(workDir: string): Promise<PowerLoss> {
    if (!existsSync(preloadPath) || !existsSync(indexPath)) return new PowerLoss(workDir, undefined);
    return new PowerLoss(workDir, (await import(indexPath)) as PowerLossModule);
  }

  /** Whether unsynced writes are lost too, or only the processes die. */
  get dropsUnsyncedWrites(): boolean {
    return this.#module !== undefined;
  }

  #journal(hostId: string): string {
    return join(this.#workDir, `powerloss-${hostId}.journal`);
  }

  /** The environment of host `hostId`'s agent: the preload that journals its writes, when there is one. */
  agentEnv(hostId: string, dataDir: string): Record<string, string> {
    if (!this.#module) return {};
    const nodeOptions = [process.env.NODE_OPTIONS, `--import=${preloadPath}`].filter(Boolean).join(' ');
    return { NODE_OPTIONS: nodeOptions, VMFERRY_POWERLOSS_JOURNAL: this.#journal(hostId), VMFERRY_POWERLOSS_ROOT: dataDir };
  }

  /** Kills every process of the host (agent, then QEMUs) and drops what it had not synced. Returns what it did. */
  async cut(cluster: LocalCluster, hostId: string): Promise<string> {
    const host = cluster.host(hostId);
    await cluster.killAgent(hostId);
    const qemus = await pidsUnder(host.dataDir);
    await killAndWait(qemus);
    if (!this.#module) return `killed the agent and ${qemus.length} QEMU(s); unsynced writes kept (test/support/power-loss/ not present)`;
    await this.#module.dropUnsynced(this.#journal(hostId), host.dataDir);
    return `killed the agent and ${qemus.length} QEMU(s); dropped unsynced writes`;
  }
}

/** QEMU processes whose command line points into `dir` (a host's data directory holds its VMs' run dirs). */
export async function pidsUnder(dir: string): Promise<number[]> {
  const found: number[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.startsWith('qemu-system') && cmdline.includes(`${dir}/`)) found.push(Number(entry));
  }
  return found;
}

/**
 * SIGKILLs the processes and waits (up to 10 s) until they are gone: a
 * process that was sent SIGKILL still holds its image locks until it exits.
 */
export async function killAndWait(pids: number[]): Promise<void> {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
  const deadline = Date.now() + 10_000;
  while (pids.some((pid) => existsSync(`/proc/${pid}/cmdline`) && !isZombie(pid)) && Date.now() < deadline) await sleep(50);
}

function isZombie(pid: number): boolean {
  try {
    return /^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return true;
  }
}

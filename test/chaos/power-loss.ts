/**
 * A host's power loss: every process of the host dies with SIGKILL (its agent
 * and its QEMUs), then whatever the agent wrote but did not fsync is lost.
 *
 * The second half is test/support/power-loss/ (branch powerloss: a preload
 * that journals each write and fsync of the agent process under a root, and
 * dropUnsynced, which reverts what was not synced). The seam: the agent runs
 * with powerLossEnv({ journal, root }) (NODE_OPTIONS=--import=… of the
 * preload, VMFERRY_POWERLOSS_JOURNAL, VMFERRY_POWERLOSS_ROOT = the host's data
 * directory), and once the host's processes are gone the harness calls
 * dropUnsynced(journal, root). While that module is absent (loaded only if
 * present, so this branch stands alone), a power loss is the kill alone, and
 * each run's note says so.
 */
import { existsSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { readdir, readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { LocalCluster } from '../../src/demo/local-cluster.ts';

const moduleDir = resolve(import.meta.dirname, '../support/power-loss');
const indexPath = join(moduleDir, 'index.ts');

/** test/support/power-loss/index.ts, as this harness uses it. */
interface PowerLossModule {
  powerLossEnv(options: { journal: string; root: string }): Record<string, string>;
  dropUnsynced(journal: string, root: string): { changes: unknown[]; warnings: string[] };
}

export class PowerLoss {
  readonly #module: PowerLossModule | undefined;

  private constructor(module: PowerLossModule | undefined) {
    this.#module = module;
  }

  static async load(): Promise<PowerLoss> {
    if (!existsSync(indexPath)) return new PowerLoss(undefined);
    return new PowerLoss((await import(indexPath)) as PowerLossModule);
  }

  /** Whether unsynced writes are lost too, or only the processes die. */
  get dropsUnsyncedWrites(): boolean {
    return this.#module !== undefined;
  }

  /** The journal sits beside the host's data directory: on the same file system, outside what it journals. */
  static #journal(dataDir: string): string {
    return `${dataDir}.powerloss-journal`;
  }

  /** The environment of an agent whose data directory is `dataDir`: the preload that journals its writes, when there is one. */
  agentEnv(dataDir: string): Record<string, string> {
    return this.#module?.powerLossEnv({ journal: PowerLoss.#journal(dataDir), root: dataDir }) ?? {};
  }

  /** Kills every process of the host (agent, then QEMUs) and drops what it had not synced. Returns what it did. */
  async cut(cluster: LocalCluster, hostId: string): Promise<string> {
    const host = cluster.host(hostId);
    await cluster.killAgent(hostId);
    const qemus = await pidsUnder(host.dataDir);
    await killAndWait(qemus);
    if (!this.#module) return `killed the agent and ${qemus.length} QEMU(s); unsynced writes kept (test/support/power-loss/ not present)`;
    const dropped = this.#module.dropUnsynced(PowerLoss.#journal(host.dataDir), host.dataDir);
    // The full list can run to dozens of lines (the journal spans every run since the agent started): the count is enough here.
    const warnings = dropped.warnings.length ? ` (${dropped.warnings.length} change(s) not modelled, kept)` : '';
    return `killed the agent and ${qemus.length} QEMU(s); dropped ${dropped.changes.length} unsynced change(s)${warnings}`;
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

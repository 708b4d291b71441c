// The throwaway Ceph cluster lives in src/demo/ceph.ts (the demo runs one too); qemu-io as a Ceph client is the tests' own.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { readFile, readdir } from 'node:fs/promises';
import { qemuImageJson, type CephClient, type RbdImageRef } from '../../src/storage/rbd.ts';
import { runProgram } from '../../src/util/run.ts';

export { startCeph, type TestCeph } from '../../src/demo/ceph.ts';

/** An interactive qemu-io on an RBD image: one librbd client that stays open between commands, as a QEMU's would. */
export class QemuIo {
  readonly #child: ChildProcessWithoutNullStreams;
  #output = '';

  private constructor(child: ChildProcessWithoutNullStreams) {
    this.#child = child;
    child.stdout.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
  }

  static async open(ref: RbdImageRef): Promise<QemuIo> {
    const io = new QemuIo(spawn('qemu-io', [qemuImageJson(ref)]));
    await io.#prompt();
    return io;
  }

  /** Runs one command and returns what it printed, once qemu-io asks for the next. */
  async run(command: string): Promise<string> {
    this.#output = '';
    this.#child.stdin.write(`${command}\n`);
    return this.#prompt();
  }

  async #prompt(): Promise<string> {
    const deadline = Date.now() + 30_000;
    while (!this.#output.includes('qemu-io> ')) {
      if (this.#child.exitCode !== null) throw new Error(`qemu-io exited: ${this.#output}`);
      if (Date.now() > deadline) throw new Error(`qemu-io did not answer within 30 s: ${this.#output}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return this.#output.replace('qemu-io> ', '');
  }

  async close(): Promise<void> {
    if (this.#child.exitCode !== null) return;
    const exited = new Promise((resolve) => this.#child.once('exit', resolve));
    this.#child.stdin.end('quit\n');
    const timer = setTimeout(() => this.#child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
}

/** Resolves once process `pid` is gone (reaped); fails after 5 s. */
export async function waitGone(pid: number): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`process ${pid} still runs 5 s later`);
}

/** The RBD fence helpers (src/storage/rbd-fence-helper.py) this process runs now, by pid, as ps shows them. */
export async function fenceHelpers(): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const [stat, cmdline] = await Promise.all([readFile(`/proc/${entry}/stat`, 'utf8'), readFile(`/proc/${entry}/cmdline`, 'utf8')]).catch(() => ['', '']);
    // The parent pid is the second field after the command name, which is in parentheses and may hold spaces.
    const parent = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    if (parent === process.pid && cmdline.includes('rbd-fence-helper.py')) pids.push(Number(entry));
  }
  return pids;
}

/**
 * The cluster's blocklist: when each address was added, in ms since the epoch, by the monitor's clock.
 * Ceph lists only the expiry; an entry added without one lasts the monitor's default, 3600 s (the test cluster keeps it).
 */
export async function blocklistAddedAt(client: CephClient): Promise<Map<string, number>> {
  const output = await runProgram('ceph', ['--conf', client.conf, '--id', client.user, 'osd', 'blocklist', 'ls', '--format', 'json']);
  // Two arrays one after the other: the addresses, then the address ranges (none here).
  const [listed] = JSON.parse(`[${output.trim().replace(/\]\s*\[/, '],[')}]`) as [{ addr: string; until: string }[]];
  return new Map(listed.map((entry) => [entry.addr, Date.parse(entry.until.replace(/\+0000$/, 'Z')) - 3_600_000]));
}

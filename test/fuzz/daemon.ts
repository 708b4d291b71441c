/**
 * A vmferry daemon (storage server, controller, agent) run through the real
 * CLI in its own process, so a fuzz test sees what a user would: a crash is an
 * exit, and memory is the process's own RSS, not shared with the test runner.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const cli = join(import.meta.dirname, '../../bin/vmferry.js');

export class Daemon {
  readonly name: string;
  readonly child: ChildProcess;
  /** The last lines of its log, for failure messages (it logs at VMFERRY_LOG=warn). */
  #stderr: string[] = [];
  #exited: Promise<void>;

  private constructor(name: string, child: ChildProcess) {
    this.name = name;
    this.child = child;
    // Always drained: a full stderr pipe would block the daemon and look like a hang.
    child.stderr?.on('data', (chunk: Buffer) => {
      this.#stderr.push(...chunk.toString().split('\n').filter((line) => line.trim() !== ''));
      if (this.#stderr.length > 200) this.#stderr = this.#stderr.slice(-100);
    });
    this.#exited = new Promise((resolve) => child.once('exit', () => resolve()));
  }

  /** Starts `vmferry ARGS…` and waits until `ready()` resolves true (polled, up to `timeoutMs`). */
  static async start(name: string, args: string[], ready: () => Promise<boolean>, timeoutMs = 30_000): Promise<Daemon> {
    const child = spawn(process.execPath, [cli, ...args], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, VMFERRY_LOG: process.env.VMFERRY_TEST_LOG ?? 'warn' },
    });
    const daemon = new Daemon(name, child);
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!daemon.alive) throw new Error(`${name} exited with ${child.exitCode ?? child.signalCode} while starting:\n${daemon.log()}`);
      if (await ready().catch(() => false)) return daemon;
      await sleep(100);
    }
    await daemon.stop();
    throw new Error(`${name} did not become ready within ${timeoutMs} ms:\n${daemon.log()}`);
  }

  get pid(): number {
    return this.child.pid as number;
  }

  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Resident memory in MiB, from /proc/PID/status. */
  rssMiB(): number {
    const status = readFileSync(`/proc/${this.pid}/status`, 'utf8');
    const kb = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1]);
    if (!Number.isFinite(kb)) throw new Error(`no VmRSS for ${this.name} (pid ${this.pid})`);
    return kb / 1024;
  }

  log(lines = 20): string {
    return this.#stderr.slice(-lines).join('\n');
  }

  /** SIGTERM, then SIGKILL after 5 s; resolves once the process is gone. */
  async stop(): Promise<void> {
    if (!this.alive) return;
    this.child.kill('SIGTERM');
    const killed = await Promise.race([this.#exited.then(() => false), sleep(5_000).then(() => true)]);
    if (killed) {
      this.child.kill('SIGKILL');
      await this.#exited;
    }
  }
}

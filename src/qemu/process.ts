/**
 * One VM as a QEMU process: started from a VmSpec, controlled over QMP,
 * stopped gracefully or by force, and watched so that a QEMU that dies is
 * noticed and reported with the tail of what it printed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { VmferryError, describeError, hasCode } from '../errors.ts';
import { QmpClient } from '../qmp/client.ts';
import { QemuMonitor, type StatusInfo } from '../qmp/commands.ts';
import { defaultQemuBinary, qemuArguments, type Accelerator, type StartMode } from './command-line.ts';
import type { VmSpec } from './spec.ts';
import { createTaps, removeTap, type TapRole } from './taps.ts';

export interface QemuStartOptions {
  mode?: StartMode;
  /** A private directory for the QMP socket, pidfile and QEMU's own log. */
  runDir: string;
  /** The host's accelerator (src/qemu/accel.ts); default TCG, for tests that start QEMU directly. */
  accel?: Accelerator;
  binary?: string;
  logger?: Logger;
  /** How long QEMU may take to open its monitor. */
  startTimeoutMs?: number;
  /** Which of the VM's tap names its NICs get (taps.ts); default 'run'. */
  tapRole?: TapRole;
  /** The agent's TLS identity in QEMU's layout (tls-creds.ts); none: plain TCP on every stream. */
  tlsDir?: string;
  /** How long a shared disk's requests wait for the storage server (command-line.ts); shorter only in tests. */
  reconnectDelayS?: number;
  /** Image files opened through the page cache whatever their cache mode (command-line.ts). */
  bufferedDisks?: string[];
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** True when vmferry asked for the exit (stop or kill); false when QEMU died on its own. */
  expected: boolean;
  /** The last lines QEMU wrote to stderr: usually the reason it died. */
  stderrTail: string;
}

export interface QemuStopOptions {
  /** Ask the guest to power off (ACPI) and wait this long before quitting QEMU. 0 skips the guest. */
  guestTimeoutMs?: number;
  /** After `quit`, wait this long before SIGKILL. */
  quitTimeoutMs?: number;
}

const stderrTailBytes = 4096;

async function readTail(path: string): Promise<string> {
  try {
    const text = await readFile(path, 'utf8');
    return text.slice(-stderrTailBytes).trim();
  } catch {
    return '';
  }
}

function waitForExit(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) {
      resolve({ code: child.exitCode, signal: child.signalCode });
      return;
    }
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
}

function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Exit of a process that is not our child (adopted): known only by its disappearance. */
async function waitForAdoptedExit(pid: number, monitorClosed: Promise<unknown>, stderrPath: string): Promise<Omit<QemuExit, 'expected'>> {
  await monitorClosed;
  while (isProcessAlive(pid)) await sleep(50);
  return { code: null, signal: null, stderrTail: await readTail(stderrPath) };
}

/**
 * Kills the QEMU whose run directory is `runDir`, if one still runs: an
 * orphan left by an agent that died mid-migration. The pid is trusted only
 * when that process's command line names this run directory (pids are reused).
 * Returns the pid it killed.
 */
export async function killOrphanQemu(runDir: string): Promise<number | undefined> {
  const pid = Number((await readFile(join(runDir, 'qemu.pid'), 'utf8').catch(() => '')).trim());
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  if (!cmdline.includes(runDir)) return undefined;
  process.kill(pid, 'SIGKILL');
  for (let i = 0; i < 200 && isProcessAlive(pid); i++) await sleep(25);
  return pid;
}

export class QemuProcess {
  readonly spec: VmSpec;
  readonly pid: number;
  readonly runDir: string;
  readonly monitor: QemuMonitor;
  /** The host taps of its NICs, removed by cleanup() once QEMU is gone. */
  readonly taps: string[];
  /** Settles when QEMU exits, however that happens. Never rejects. */
  readonly exited: Promise<QemuExit>;
  readonly #logger: Logger | undefined;
  #exitRequested = false;
  #exitInfo: QemuExit | undefined;

  private constructor(spec: VmSpec, pid: number, monitor: QemuMonitor, runDir: string, exited: Promise<QemuExit>, taps: string[], logger?: Logger) {
    this.spec = spec;
    this.taps = taps;
    this.pid = pid;
    this.monitor = monitor;
    this.runDir = runDir;
    this.#logger = logger;
    this.exited = exited.then((exit) => {
      const info = { ...exit, expected: this.#exitRequested };
      this.#exitInfo = info;
      if (!info.expected) {
        logger?.error({ code: info.code, signal: info.signal, stderr: info.stderrTail }, `QEMU of VM ${spec.name} exited unexpectedly`);
      }
      return info;
    });
  }

  static async start(spec: VmSpec, options: QemuStartOptions): Promise<QemuProcess> {
    const mode = options.mode ?? 'run';
    await mkdir(options.runDir, { recursive: true });
    const qmpSocket = join(options.runDir, 'qmp.sock');
    const pidFile = join(options.runDir, 'qemu.pid');
    const stderrPath = join(options.runDir, 'qemu.log');
    await rm(qmpSocket, { force: true });
    const taps = await createTaps(spec, options.tapRole ?? 'run');
    try {
      return await QemuProcess.#spawn(spec, options, { mode, qmpSocket, pidFile, stderrPath, taps });
    } catch (err) {
      for (const tap of taps) await removeTap(tap).catch(() => undefined);
      throw err;
    }
  }

  static async #spawn(
    spec: VmSpec,
    options: QemuStartOptions,
    { mode, qmpSocket, pidFile, stderrPath, taps }: { mode: StartMode; qmpSocket: string; pidFile: string; stderrPath: string; taps: string[] },
  ): Promise<QemuProcess> {
    const args = qemuArguments(spec, { mode, qmpSocket, pidFile, accel: options.accel ?? 'tcg', taps, ...(options.tlsDir === undefined ? {} : { tlsDir: options.tlsDir }), ...(options.reconnectDelayS === undefined ? {} : { reconnectDelayS: options.reconnectDelayS }), ...(options.bufferedDisks === undefined ? {} : { bufferedDisks: options.bufferedDisks }) });
    const binary = options.binary ?? defaultQemuBinary;
    const logger = options.logger?.child({ vm: spec.name });
    logger?.debug({ binary, args }, 'starting QEMU');

    const stderrFile = await open(stderrPath, 'a');
    let child: ChildProcess;
    try {
      // Its own process group: a Ctrl-C aimed at vmferry must not take the guests down with it.
      child = spawn(binary, args, { stdio: ['ignore', stderrFile.fd, stderrFile.fd], detached: true });
    } finally {
      await stderrFile.close();
    }
    const spawnError = new Promise<never>((_, reject) => {
      child.once('error', (err) => {
        const code = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'VMF_TOOL_MISSING' : 'VMF_QEMU_START';
        reject(new VmferryError(code, `cannot run ${binary} for VM ${spec.name}: ${err.message}`, { cause: err }));
      });
    });
    spawnError.catch(() => undefined);
    const exited = waitForExit(child).then(async (exit) => ({ ...exit, expected: false, stderrTail: await readTail(stderrPath) }));

    const died = exited.then((exit) => {
      throw new VmferryError(
        'VMF_QEMU_START',
        `QEMU for VM ${spec.name} exited during start (code ${exit.code}, signal ${exit.signal}): ${exit.stderrTail || 'no output'}`,
      );
    });
    died.catch(() => undefined);
    const connectAbort = new AbortController();
    try {
      const client = await Promise.race([
        QmpClient.connect(qmpSocket, { timeoutMs: options.startTimeoutMs ?? 30_000, signal: connectAbort.signal, logger }),
        died,
        spawnError,
      ]);
      const vm = new QemuProcess(spec, child.pid as number, new QemuMonitor(client), options.runDir, exited, taps, logger);
      logger?.info({ pid: vm.pid, mode }, 'QEMU started');
      return vm;
    } catch (err) {
      connectAbort.abort();
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      const exit = await exited;
      if (err instanceof VmferryError && err.code !== 'VMF_QMP_CONNECT') throw err;
      // A QEMU that exits on an error as its monitor opens resets the connection before its exit is seen: its own words say why.
      const said = exit.stderrTail ? `; QEMU said: ${exit.stderrTail}` : '';
      throw new VmferryError('VMF_QEMU_START', `QEMU for VM ${spec.name} did not open its monitor: ${describeError(err)}${said}`, { cause: err });
    }
  }

  /**
   * Takes over a QEMU started earlier (by a previous agent process) from its
   * run directory: the pidfile says which process, the QMP socket reconnects.
   * Returns undefined when that QEMU is no longer running.
   */
  static async adopt(spec: VmSpec, runDir: string, logger?: Logger): Promise<QemuProcess | undefined> {
    const pid = Number((await readFile(join(runDir, 'qemu.pid'), 'utf8').catch(() => '')).trim());
    if (!Number.isInteger(pid) || pid <= 0 || !isProcessAlive(pid)) return undefined;
    const client = await QmpClient.connect(join(runDir, 'qmp.sock'), { timeoutMs: 5_000, logger }).catch(() => undefined);
    if (!client) return undefined;
    const exited = waitForAdoptedExit(pid, client.closed, join(runDir, 'qemu.log')).then((exit) => ({ ...exit, expected: false }));
    // Which role's taps it was given is on its own command line.
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    const taps = [...cmdline.matchAll(/ifname=([^,\0]+)/g)].map((m) => m[1] as string);
    logger?.info({ pid, vm: spec.name }, 'adopted running QEMU');
    return new QemuProcess(spec, pid, new QemuMonitor(client), runDir, exited, taps, logger);
  }

  /** True until the process has exited. */
  get isAlive(): boolean {
    return this.#exitInfo === undefined && isProcessAlive(this.pid);
  }

  status(): Promise<StatusInfo> {
    return this.qmp('query-status', (monitor) => monitor.queryStatus());
  }

  /**
   * The run state, or undefined when the process has exited. A QEMU killed a
   * moment ago still looks alive until its exit is reaped; the query then
   * fails with VMF_QEMU_EXITED, which means the same thing here.
   */
  async statusUnlessExited(): Promise<StatusInfo | undefined> {
    if (!this.isAlive) return undefined;
    try {
      return await this.status();
    } catch (err) {
      if (hasCode(err, 'VMF_QEMU_EXITED')) return undefined;
      throw err;
    }
  }

  /**
   * Stops the VM: an ACPI power-off request to the guest first (when asked),
   * then QMP quit, then SIGKILL, each after its timeout. Safe to call twice.
   */
  async stop(options: QemuStopOptions = {}): Promise<QemuExit> {
    if (!this.isAlive) return this.exited;
    this.#exitRequested = true;
    const guestTimeoutMs = options.guestTimeoutMs ?? 0;
    if (guestTimeoutMs > 0 && (await this.#tryExit(() => this.monitor.systemPowerdown(), guestTimeoutMs))) return this.exited;
    if (await this.#tryExit(() => this.monitor.quit(), options.quitTimeoutMs ?? 5_000)) return this.exited;
    this.#logger?.warn(`QEMU of VM ${this.spec.name} ignored quit; killing it`);
    return this.kill();
  }

  /** SIGKILL: for a QEMU that no longer answers, or for tests that simulate a crash. */
  async kill(): Promise<QemuExit> {
    this.#exitRequested = true;
    if (this.isAlive) process.kill(this.pid, 'SIGKILL');
    return this.exited;
  }

  /** Removes the run directory (socket, pidfile, log) and the NICs' taps once QEMU is gone. */
  async cleanup(): Promise<void> {
    await this.exited;
    this.monitor.client.close();
    for (const tap of this.taps) await removeTap(tap);
    await rm(this.runDir, { recursive: true, force: true });
  }

  async #tryExit(request: () => Promise<void>, timeoutMs: number): Promise<boolean> {
    try {
      await request();
    } catch (err) {
      // A closed monitor during quit means QEMU is already on its way out.
      this.#logger?.debug({ err: describeError(err) }, 'stop request failed');
    }
    const timer = new Promise<false>((resolve) => setTimeout(resolve, timeoutMs, false).unref());
    return Promise.race([this.exited.then(() => true), timer]);
  }

  /**
   * Runs QMP calls; if they fail because QEMU is gone, the error becomes
   * VMF_QEMU_EXITED with QEMU's last words instead of a bare "socket closed".
   */
  async qmp<T>(what: string, call: (monitor: QemuMonitor) => Promise<T>): Promise<T> {
    try {
      return await call(this.monitor);
    } catch (err) {
      if (!this.isAlive || this.monitor.client.isClosed) {
        const exit = await this.exited;
        throw new VmferryError(
          'VMF_QEMU_EXITED',
          `QEMU of VM ${this.spec.name} exited (code ${exit.code}, signal ${exit.signal}) during ${what}: ${exit.stderrTail || 'no output'}`,
          { cause: err },
        );
      }
      throw err;
    }
  }
}

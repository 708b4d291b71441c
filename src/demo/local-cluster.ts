/**
 * A whole vmferry cluster on one machine: a storage server and a controller in
 * this process (or either in its own), and one agent process per host, each host in its own network
 * namespace (as root) or on its own loopback address (otherwise). The demo and
 * the end-to-end tests run on it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import { AgentClient } from '../agent/client.ts';
import { ControllerClient } from '../controller/client.ts';
import { buildController } from '../controller/server.ts';
import { StorageServer } from '../storage/server.ts';
import { requestJson } from '../http/errors.ts';
import type { AccelMode } from '../qemu/accel.ts';
import { pollUntil } from '../util/poll.ts';
import { findFreePort } from '../util/ports.ts';
import { runProgram } from '../util/run.ts';
import { canUseNamespaces, createGuestSegment, createNamespaceNetwork, type GuestSegment, type NamespaceNetwork } from './netns.ts';
import { ClusterPki } from './cluster-pki.ts';
import { testGuestDir } from '../guest/test-guest.ts';

/** How long a daemon it started may take to answer, and how often it is asked meanwhile. */
const daemonStartMs = 30_000;
const daemonPollMs = 200;

const cliPath = resolve(import.meta.dirname, '../../bin/vmferry.js');
const agentPort = 10801;

export interface ClusterHost {
  id: string;
  address: string;
  dataDir: string;
  agentUrl: string;
  /** The agent's command line, to start it again after a kill. */
  command: string[];
  process: ChildProcess;
  namespace: string | undefined;
}

export interface LocalClusterOptions {
  workDir: string;
  hostIds: string[];
  logger: Logger;
  /** Put each host in a network namespace; default: when running as root. */
  namespaces?: boolean;
  /** Names and addresses of the namespaces, so several clusters can coexist (default vmfd, 10.213.7). */
  network?: { prefix: string; subnet: string; hostLinkSubnet?: string };
  /**
   * One L2 segment for the guests' NICs (netns.ts createGuestSegment): a bridge
   * on every host, a switch and a client namespace, on a /24 of its own. Needs namespaces.
   */
  guestNetwork?: { subnet: string };
  /** Run the controller as its own process, so it can be killed like a crash would (default: in this process). */
  controllerProcess?: boolean;
  /** The controllers' database (default: a SQLite file in workDir); a postgres:// URL lets several share it. */
  db?: string;
  /** With controllerProcess and a postgres:// db: this many controller processes, the first the leader at start (default 1). */
  controllers?: number;
  /** The controllers' --lease-ttl, in seconds (default: the controller's own). */
  leaseTtlS?: number;
  /** The agents' --abandon-after, in seconds (default: the agent's own, 60). */
  abandonAfterS?: number;
  /** The agents' --accel (default: the agent's own, auto: a KVM probe of a few seconds at each agent start where KVM hangs). */
  accel?: AccelMode;
  /** Run the storage server as its own process (`vmferry storage serve`), so it can be killed like a crash would. */
  storageProcess?: boolean;
  /**
   * Called once per host before its agent starts: returns the URL the agent
   * advertises to the controller instead of its own (`--advertise-url`), e.g.
   * a proxy in front of it.
   */
  agentFront?: (host: { id: string; agentUrl: string; gateway: string }) => Promise<string>;
  /** Extra environment of a host's agent process (kept across restarts). */
  agentEnv?: (host: { id: string; dataDir: string }) => Record<string, string>;
  /** Directories the agents trust for host files (--trusted-dir) besides the test guest's, e.g. of images to import. */
  trustedDirs?: string[];
  /** Mutual TLS on every HTTP API, with a throwaway CA under workDir/pki (opt-in until TLS is the default). */
  tls?: boolean;
}

export class LocalCluster {
  readonly hosts: ClusterHost[] = [];
  readonly workDir: string;
  /** The storage server's admin API, wherever it runs. */
  storageAdminUrl = '';
  /** Every controller's URL, separated by commas (what `--controller` takes). */
  controllerUrl = '';
  controllerUrls: string[] = [];
  /** Where QEMU on every host reaches the storage server's NBD port. */
  storageNbd!: { host: string; port: number };
  network: NamespaceNetwork | undefined;
  /** The guests' L2 segment, when the cluster was started with guestNetwork. */
  guestSegment: GuestSegment | undefined;
  readonly #logger: Logger;
  #controller: FastifyInstance | undefined;
  readonly #controllerProcesses: { command: string[]; child: ChildProcess }[] = [];
  #storage: StorageServer | undefined;
  #storageProcess: { command: string[]; child: ChildProcess } | undefined;
  #agentEnv: ((host: { id: string; dataDir: string }) => Record<string, string>) | undefined;
  /** With the tls option: the cluster's CA and the identities it calls its daemons with. */
  pki: ClusterPki | undefined;

  private constructor(workDir: string, logger: Logger) {
    this.workDir = workDir;
    this.#logger = logger;
  }

  static async start(options: LocalClusterOptions): Promise<LocalCluster> {
    const cluster = new LocalCluster(options.workDir, options.logger);
    try {
      await cluster.#start(options);
    } catch (err) {
      await cluster.stop();
      throw err;
    }
    return cluster;
  }

  /** The in-process storage server (a cluster started with storageProcess has none: use its admin URL). */
  get storage(): StorageServer {
    if (!this.#storage) throw new VmferryError('VMF_INVALID_ARGUMENT', 'this cluster runs its storage server as a process: use storageAdminUrl');
    return this.#storage;
  }

  get api(): ControllerClient {
    return new ControllerClient(this.controllerUrl, this.pki?.operator);
  }

  host(id: string): ClusterHost {
    const host = this.hosts.find((h) => h.id === id);
    if (!host) throw new VmferryError('VMF_NOT_FOUND', `no host ${id} in this cluster`);
    return host;
  }

  async #start(options: LocalClusterOptions): Promise<void> {
    await mkdir(this.workDir, { recursive: true });
    const useNamespaces = options.namespaces ?? canUseNamespaces();
    if (useNamespaces) {
      const { prefix, ...network } = options.network ?? { prefix: 'vmfd', subnet: '10.213.7' };
      this.network = await createNamespaceNetwork(prefix, options.hostIds, network);
      if (options.guestNetwork) this.guestSegment = await createGuestSegment(prefix, this.network.hosts, options.guestNetwork);
    } else if (options.guestNetwork) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', 'a guest network needs network namespaces (run as root, without --loopback)');
    }
    // Services of the "core" listen where every host reaches them: the bridge, or loopback.
    const serviceHost = this.network?.gateway ?? '127.0.0.1';
    if (options.tls) this.pki = await ClusterPki.create(join(this.workDir, 'pki'), serviceHost);
    const scheme = this.pki ? 'https' : 'http';

    this.storageNbd = { host: serviceHost, port: await findFreePort(serviceHost) };
    if (options.storageProcess) {
      const admin = `${serviceHost}:${await findFreePort(serviceHost)}`;
      const command = [process.execPath, cliPath, 'storage', 'serve', '--data-dir', join(this.workDir, 'storage'), '--listen', `${this.storageNbd.host}:${this.storageNbd.port}`, '--admin', admin, ...this.#pkiArgs('storage')];
      this.#storageProcess = { command, child: this.#spawnDaemon('storage', command) };
      this.storageAdminUrl = `${scheme}://${admin}`;
      await this.#waitStorage();
    } else {
      this.#storage = await this.#startStorage(this.storageNbd, { host: serviceHost, port: 0 });
      this.storageAdminUrl = this.#storage.addresses.adminUrl as string;
    }
    this.#agentEnv = options.agentEnv;

    const dbPath = options.db ?? join(this.workDir, 'controller.db');
    const controllerPort = await findFreePort(serviceHost);
    if (options.controllerProcess) {
      for (let index = 0; index < (options.controllers ?? 1); index++) {
        const port = index === 0 ? controllerPort : await findFreePort(serviceHost);
        const command = [process.execPath, cliPath, 'controller', '--listen', `${serviceHost}:${port}`, '--db', dbPath, '--storage', this.storageAdminUrl, ...this.#pkiArgs('controller')];
        if (options.leaseTtlS !== undefined) command.push('--lease-ttl', String(options.leaseTtlS));
        this.#controllerProcesses.push({ command, child: this.#spawnDaemon(`controller ${index}`, command) });
        this.controllerUrls.push(`${scheme}://${serviceHost}:${port}`);
        this.controllerUrl = this.controllerUrls.join(',');
        // One at a time: the first to answer leads, so a test knows which one to kill.
        await this.#waitController(index);
      }
    } else {
      const controller = await buildController({
        dbPath,
        logger: this.#logger.child({ component: 'controller' }),
        storage: { url: this.storageAdminUrl, ...(this.pki ? { tls: this.pki.controller } : {}) },
        ...(this.pki ? { tls: this.pki.controller } : {}),
      });
      this.#controller = controller.app;
      this.controllerUrl = await controller.app.listen({ host: serviceHost, port: controllerPort });
      this.controllerUrls = [this.controllerUrl];
    }

    for (const [index, id] of options.hostIds.entries()) {
      const namespaceHost = this.network?.hosts[index];
      const address = namespaceHost?.address ?? `127.0.0.${index + 2}`;
      const dataDir = join(this.workDir, `host-${id}`);
      const agentUrl = `${scheme}://${address}:${agentPort}`;
      const args = [cliPath, '--controller', this.controllerUrl, 'agent', '--host-id', id, '--listen', `${address}:${agentPort}`, '--data-dir', dataDir, '--storage', this.storageAdminUrl];
      args.push('--storage-nbd', `${this.storageNbd.host}:${this.storageNbd.port}`);
      for (const dir of [testGuestDir(), ...(options.trustedDirs ?? [])]) args.push('--trusted-dir', dir);
      if (options.agentFront) args.push('--advertise-url', await options.agentFront({ id, agentUrl, gateway: serviceHost }));
      // Migration streams and mirror exports go over the direct link when there is one.
      if (namespaceHost?.linkAddress) args.push('--address', namespaceHost.linkAddress);
      if (options.abandonAfterS !== undefined) args.push('--abandon-after', String(options.abandonAfterS));
      if (options.accel !== undefined) args.push('--accel', options.accel);
      if (this.pki) args.push('--pki-dir', await this.pki.issueAgent(id, [address, ...(namespaceHost?.linkAddress ? [namespaceHost.linkAddress] : [])]));
      else args.push('--insecure');
      const command = namespaceHost ? ['ip', 'netns', 'exec', namespaceHost.namespace, process.execPath, ...args] : [process.execPath, ...args];
      this.hosts.push({ id, address, dataDir, agentUrl, command, process: this.#spawnDaemon(`host ${id}`, command, this.#agentEnv?.({ id, dataDir })), namespace: namespaceHost?.namespace });
    }
    // An agent starts in seconds, and in half a minute on a loaded machine (its KVM probe, node itself).
    await this.waitForHosts(options.hostIds, 60_000);
  }

  /** Waits until the controller sees every host as reachable. */
  async waitForHosts(ids: string[], timeoutMs: number): Promise<void> {
    await pollUntil(
      async () => {
        const reachable = new Set((await this.api.hosts()).filter((h) => h.state === 'reachable').map((h) => h.id));
        if (ids.every((id) => reachable.has(id))) return true;
        const dead = this.hosts.find((h) => h.process.exitCode !== null);
        if (dead) throw new VmferryError('VMF_UNREACHABLE', `the agent of host ${dead.id} exited with code ${dead.process.exitCode}`);
        return undefined;
      },
      { timeoutMs, intervalMs: daemonPollMs, timeoutMessage: `hosts ${ids.join(', ')} did not all report within ${timeoutMs} ms` },
    );
  }

  #pkiArgs(role: 'controller' | 'storage'): string[] {
    return this.pki ? ['--pki-dir', this.pki.daemonDir(role)] : ['--insecure'];
  }

  #spawnDaemon(label: string, [command, ...args]: string[], env: Record<string, string> = {}): ChildProcess {
    const child = spawn(command as string, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, VMFERRY_LOG: process.env.VMFERRY_LOG ?? 'warn', ...env } });
    // Always read stderr: an unread pipe fills up and blocks the daemon on its next log line.
    child.stderr?.on('data', (chunk: Buffer) => this.#logger.debug({ daemon: label }, chunk.toString().trimEnd()));
    return child;
  }

  #controllerProcess(index: number): { command: string[]; child: ChildProcess } {
    const controller = this.#controllerProcesses[index];
    if (!controller) throw new VmferryError('VMF_INVALID_ARGUMENT', `this cluster has no controller process ${index} (start it with controllerProcess: true, and controllers for several)`);
    return controller;
  }

  /** Kills a controller process with SIGKILL, as a crash would; agents and guests carry on. */
  async killController(index = 0): Promise<void> {
    await killProcess(this.#controllerProcess(index).child);
  }

  /** Sends a controller process a signal: SIGSTOP pauses it as a stalled machine would, SIGCONT lets it go on. */
  signalController(index: number, signal: 'SIGSTOP' | 'SIGCONT'): void {
    this.#controllerProcess(index).child.kill(signal);
  }

  /** Starts a controller process again on the same address and database, and waits until it answers. */
  async startController(index = 0): Promise<void> {
    const controller = this.#controllerProcess(index);
    controller.child = this.#spawnDaemon(`controller ${index}`, controller.command);
    await this.#waitController(index);
  }

  /** Which controller leads, as controller `index` sees it (GET /v1/leader). */
  leadership(index: number): Promise<{ self: string | null; leader: boolean; leaderUrl: string | null; epoch: number | null }> {
    return requestJson(this.controllerUrls[index] ?? '', 'GET', '/v1/leader', { timeoutMs: 5_000, tls: this.pki?.operator, server: { role: 'controller' } });
  }

  async #waitController(index: number): Promise<void> {
    const child = this.#controllerProcesses[index]?.child;
    const own = new ControllerClient(this.controllerUrls[index] ?? '', this.pki?.operator);
    await pollUntil(
      async () => {
        if (await own.hosts().then(() => true, () => false)) return true;
        if (child && child.exitCode !== null) throw new VmferryError('VMF_UNREACHABLE', `the controller exited with code ${child.exitCode}`);
        return undefined;
      },
      { timeoutMs: daemonStartMs, intervalMs: daemonPollMs, timeoutMessage: `the controller did not answer within ${daemonStartMs / 1000} s` },
    );
  }

  /** Kills one host's agent with SIGKILL, as a crash would (its QEMUs keep running). */
  async killAgent(id: string): Promise<void> {
    await killProcess(this.host(id).process);
  }

  /** Stops the storage server and starts it again on the same ports and data; QEMU's NBD clients reconnect. */
  async restartStorage(outageMs = 0): Promise<void> {
    if (this.#storageProcess) {
      await stopProcess(this.#storageProcess.child);
    } else {
      await this.storage.close();
    }
    if (outageMs > 0) await sleep(outageMs);
    await this.startStorage();
  }

  /** Kills the storage server process with SIGKILL, as a crash would (storageProcess only). */
  async killStorage(): Promise<void> {
    if (!this.#storageProcess) throw new VmferryError('VMF_INVALID_ARGUMENT', 'this cluster runs its storage server in-process (start it with storageProcess: true)');
    await killProcess(this.#storageProcess.child);
  }

  /** Starts the storage server again on the same ports and data, and waits until it answers. */
  async startStorage(): Promise<void> {
    if (this.#storageProcess) {
      this.#storageProcess.child = this.#spawnDaemon('storage', this.#storageProcess.command);
      await this.#waitStorage();
      return;
    }
    const admin = new URL(this.storageAdminUrl);
    this.#storage = await this.#startStorage(this.storageNbd, { host: admin.hostname, port: Number(admin.port) });
  }

  async #waitStorage(): Promise<void> {
    const child = this.#storageProcess?.child;
    await pollUntil(
      async () => {
        if (await requestJson(this.storageAdminUrl, 'GET', '/v1/volumes', { timeoutMs: 2_000, tls: this.pki?.controller, server: { role: 'storage' } }).then(() => true, () => false)) return true;
        if (child && child.exitCode !== null) throw new VmferryError('VMF_UNREACHABLE', `the storage server exited with code ${child.exitCode}`);
        return undefined;
      },
      { timeoutMs: daemonStartMs, intervalMs: daemonPollMs, timeoutMessage: `the storage server did not answer within ${daemonStartMs / 1000} s` },
    );
  }

  /** Creates a shared volume on the storage server, wherever it runs. */
  async createVolume(name: string, sizeBytes: number): Promise<void> {
    await requestJson(this.storageAdminUrl, 'POST', '/v1/volumes', { body: { name, sizeBytes }, tls: this.pki?.controller, server: { role: 'storage' } });
  }

  /** `force`: even while a writer lease or a recent client holds it (see storage/volumes.ts). */
  async removeVolume(name: string, options: { force?: boolean } = {}): Promise<void> {
    await requestJson(this.storageAdminUrl, 'DELETE', `/v1/volumes/${encodeURIComponent(name)}${options.force ? '?force=true' : ''}`, { tls: this.pki?.controller, server: { role: 'storage' } });
  }

  #startStorage(nbd: { host: string; port: number }, admin: { host: string; port: number }): Promise<StorageServer> {
    return StorageServer.start({ dataDir: join(this.workDir, 'storage'), logger: this.#logger.child({ component: 'storage' }), nbd, admin, ...(this.pki ? { tls: this.pki.storage } : {}) });
  }

  /** Restarts one host's agent process (its guests keep running and are re-adopted). */
  async restartAgent(id: string): Promise<void> {
    const host = this.host(id);
    await stopProcess(host.process);
    await this.startAgent(id);
  }

  /** Starts a host's agent again after it stopped or was killed, and waits until it answers. */
  async startAgent(id: string): Promise<void> {
    const host = this.host(id);
    host.process = this.#spawnDaemon(`host ${id}`, host.command, this.#agentEnv?.(host));
    // The controller may still count the old agent's last heartbeat: ask the new one itself.
    const agent = new AgentClient(host.agentUrl, this.pki?.controller, id);
    await pollUntil(
      async () => {
        if (await agent.host().then(() => true, () => false)) return true;
        if (host.process.exitCode !== null) throw new VmferryError('VMF_UNREACHABLE', `the restarted agent of host ${id} exited with code ${host.process.exitCode}`);
        return undefined;
      },
      { timeoutMs: daemonStartMs, intervalMs: daemonPollMs, timeoutMessage: `the restarted agent of host ${id} did not answer within ${daemonStartMs / 1000} s` },
    );
  }

  /** Deletes every VM (killing its QEMU), stops agents, controller and storage, removes the network. */
  async stop(): Promise<void> {
    if (this.controllerUrl) {
      const vms = await this.api.vms().catch(() => []);
      for (const vm of vms) {
        await this.api.stopVm(vm.name, true).catch((err: unknown) => this.#logger.warn({ err: describeError(err) }, `could not stop VM ${vm.name}`));
        await this.api.deleteVm(vm.name).catch((err: unknown) => this.#logger.warn({ err: describeError(err) }, `could not delete VM ${vm.name}`));
      }
    }
    for (const host of this.hosts) await stopProcess(host.process);
    // Anything still running in a host's namespace (a QEMU whose agent died) goes with it.
    for (const host of this.hosts.filter((h) => h.namespace)) {
      const pids = await runProgram('ip', ['netns', 'pids', host.namespace as string]).catch(() => '');
      for (const pid of pids.split('\n').map(Number).filter((p) => p > 0)) process.kill(pid, 'SIGKILL');
    }
    await this.#controller?.close();
    for (const controller of this.#controllerProcesses) {
      // A paused one would not hear SIGTERM.
      controller.child.kill('SIGCONT');
      await stopProcess(controller.child);
    }
    await this.#storage?.close().catch(() => undefined);
    if (this.#storageProcess) await stopProcess(this.#storageProcess.child);
    await this.guestSegment?.remove();
    await this.network?.remove();
    await rm(this.workDir, { recursive: true, force: true });
  }
}

async function killProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await exited;
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(timer);
}

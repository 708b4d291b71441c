/** `vmferry agent` and `vmferry controller`: the two long-running processes. */
import type { Command } from 'commander';
import { VmferryError } from '../errors.ts';
import { chooseAccelerator, parseAccelMode } from '../qemu/accel.ts';
import { collect, daemonLogger, parseListen, untilSignal } from './common.ts';
import { daemonTls, insecureHelp } from './tls-options.ts';
import { tlsGlobals, withConfigFile } from './config-file.ts';
import type { NbdServerAddress } from '../qemu/spec.ts';
import { parseControllerUrls } from '../controller/failover.ts';

export function registerDaemonCommands(program: Command): void {
  const agent = program
    .command('agent')
    .description('run the per-host agent: VMs on this host and its half of each migration')
    .option('--host-id <name>', 'this host\'s name in the cluster (required)')
    .option('--listen <host:port>', 'address of the agent\'s HTTP API (required)')
    .option('--data-dir <dir>', 'where VM specs, logs and the local pool live (required)')
    .option('--address <ip>', 'address other hosts reach this one at (default: the --listen host)')
    .option('--storage <url>', 'the storage server\'s admin URL, to fence shared volumes to one writer (or VMFERRY_STORAGE)', process.env.VMFERRY_STORAGE)
    .option('--storage-nbd <host:port>', 'the storage server\'s NBD address, the only server shared disks may be on (default: the --storage host, port 10809)')
    .option('--trusted-dir <dir>', 'a directory whose files (kernels, initrds, images to import) requests may name; repeatable (none: every request naming a host file is refused)', collect, [])
    .option('--advertise-url <url>', 'the URL the controller reaches this agent at, when not the --listen address (a proxy or NAT in front of it)')
    .option('--accel <mode>', 'what runs guests: auto (KVM when a probe guest runs under it, else TCG), kvm (refuse to start without it) or tcg', 'auto')
    .option('--insecure', insecureHelp)
    .option('--abandon-after <seconds>', 'settle a migration half alone once no controller has touched it this long, where that is safe (0: never)', '60');
  withConfigFile(agent, 'agent', { required: ['host-id', 'listen', 'data-dir'], globals: ['controller', ...tlsGlobals] })
    .action(async (_opts, command: Command) => {
      // --controller is the global option: the controller this agent registers with and heartbeats to.
      const opts = command.optsWithGlobals<{
        hostId: string;
        listen: string;
        dataDir: string;
        address?: string;
        storage?: string;
        storageNbd?: string;
        trustedDir: string[];
        accel: string;
        abandonAfter: string;
        advertiseUrl?: string;
        controller: string;
      }>();
      const listen = parseListen(opts.listen, '--listen');
      const abandonAfterS = Number(opts.abandonAfter);
      if (!Number.isFinite(abandonAfterS) || abandonAfterS < 0) throw new VmferryError('VMF_INVALID_ARGUMENT', `--abandon-after must be a number of seconds, 0 or more (got "${opts.abandonAfter}")`);
      const advertiseUrl = opts.advertiseUrl === undefined ? undefined : parseHttpUrl(opts.advertiseUrl, '--advertise-url');
      const accelMode = parseAccelMode(opts.accel, '--accel');
      const logger = daemonLogger(`agent-${opts.hostId}`);
      const tls = daemonTls(command, 'agent', logger);
      // Before anything listens: with --accel kvm on a host whose KVM cannot run a guest, the agent does not start at all.
      const accelerator = await chooseAccelerator(accelMode);
      logger.info({ accelerator: accelerator.accelerator, reason: accelerator.reason }, `guests run under ${accelerator.accelerator.toUpperCase()}: ${accelerator.reason}`);
      if (accelerator.accelerator === 'tcg') {
        // TCG guests' switch-overs compare RAM with a native hasher: built now, in the background, not at the first migration.
        const { loadRamHasher } = await import('../qemu/ram-hasher.ts');
        loadRamHasher().catch((err: unknown) => logger.warn({ err: (err as Error).message }, 'memory digests cannot run: TCG guests will not migrate'));
      }
      const address = opts.address ?? listen.host;
      const storageNbd = storageNbdAddress(opts.storageNbd, opts.storage);
      // The daemons' code is loaded by the command that runs it, so the CLI's other commands start fast.
      const [{ buildAgent }, { startHeartbeat }] = await Promise.all([import('../agent/server.ts'), import('../agent/heartbeat.ts')]);
      const { app } = await buildAgent({
        hostId: opts.hostId,
        dataDir: opts.dataDir,
        address,
        logger,
        abandonAfterMs: abandonAfterS * 1000,
        accelerator,
        trustedDirs: opts.trustedDir,
        ...(storageNbd ? { storageNbd } : {}),
        ...(opts.storage ? { storageUrl: opts.storage } : {}),
        ...(tls ? { tls } : {}),
      });
      const url = await app.listen({ host: listen.host, port: listen.port });
      logger.info({ url }, `agent ${opts.hostId} listening`);
      const stopHeartbeat = startHeartbeat(
        parseControllerUrls(opts.controller),
        { id: opts.hostId, url: advertiseUrl ?? url, address, accelerator: accelerator.accelerator, acceleratorReason: accelerator.reason },
        logger,
        tls,
      );
      await untilSignal();
      // Guests keep running: they are re-adopted when the agent starts again.
      stopHeartbeat();
      await app.close();
    });

  const controller = program
    .command('controller')
    .description('run the controller: inventory, placement checks, migrations through the agents')
    .option('--listen <host:port>', 'address of the controller\'s HTTP API (required)')
    .option('--db <file|url>', 'where the controller keeps its state: a SQLite file, or a postgres://user@host:port/database URL shared by several controllers (or VMFERRY_DB; required)', process.env.VMFERRY_DB)
    .option('--storage <url>', 'the storage server\'s admin URL: a migration\'s report then says what it read and wrote for each re-attached disk (or VMFERRY_STORAGE)', process.env.VMFERRY_STORAGE)
    .option('--advertise-url <url>', 'the URL clients and the other controllers reach this one at, when not the --listen address; with PostgreSQL, standbys name it as the leader')
    .option('--lease-ttl <seconds>', 'with PostgreSQL: how long the leader lease holds unrenewed, so how soon a standby takes over from a dead leader', '5')
    .option('--insecure', insecureHelp);
  withConfigFile(controller, 'controller', { required: ['listen', 'db'], globals: tlsGlobals })
    .action(async (opts: { listen: string; db: string; storage?: string; advertiseUrl?: string; leaseTtl: string }, command: Command) => {
      const listen = parseListen(opts.listen, '--listen');
      const leaseTtlS = Number(opts.leaseTtl);
      // Below a second a renewal every third of it is a database query every few hundred milliseconds, and a GC pause loses the lease.
      if (!Number.isFinite(leaseTtlS) || leaseTtlS < 1 || leaseTtlS > 600) throw new VmferryError('VMF_INVALID_ARGUMENT', `--lease-ttl must be a number of seconds from 1 to 600 (got "${opts.leaseTtl}")`);
      const logger = daemonLogger('controller');
      const tls = daemonTls(command, 'controller', logger);
      const ownUrl = opts.advertiseUrl === undefined ? `${tls ? 'https' : 'http'}://${opts.listen}` : parseHttpUrl(opts.advertiseUrl, '--advertise-url');
      const { buildController } = await import('../controller/server.ts');
      const { app } = await buildController({
        dbPath: opts.db,
        logger,
        url: ownUrl,
        leaseTtlMs: leaseTtlS * 1000,
        ...(tls ? { tls } : {}),
        ...(opts.storage ? { storage: { url: opts.storage, ...(tls ? { tls } : {}) } } : {}),
      });
      const url = await app.listen({ host: listen.host, port: listen.port });
      logger.info({ url }, 'controller listening');
      await untilSignal();
      await app.close();
    });
}

/** The storage server's NBD address: --storage-nbd, else the --storage URL's host on NBD's port. */
function storageNbdAddress(option: string | undefined, storageUrl: string | undefined): NbdServerAddress | undefined {
  if (option !== undefined) return { type: 'inet', ...parseListen(option, '--storage-nbd') };
  return storageUrl === undefined ? undefined : { type: 'inet', host: new URL(parseHttpUrl(storageUrl, '--storage')).hostname.replace(/^\[|\]$/g, ''), port: 10809 };
}

/** An http(s) URL without a path, as the controller joins API paths onto it. */
function parseHttpUrl(text: string, option: string): string {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `${option} must be a URL such as http://10.0.0.2:10801 (got "${text}")`);
  }
  if ((url.protocol !== 'http:' && url.protocol !== 'https:') || url.pathname !== '/' || url.search || url.hash) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `${option} must be an http(s) URL with no path, such as http://10.0.0.2:10801 (got "${text}")`);
  }
  return url.origin;
}

/** `vmferry storage serve` and `vmferry volume …`. */
import type { Command } from 'commander';
import { requestJson, type ExpectedServer } from '../http/errors.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import { formatBytes } from '../util/format.ts';
import { defaultLimits } from '../nbd/server.ts';
import type { QuarantinedFile } from '../storage/quarantine.ts';
import type { Volume } from '../storage/volumes.ts';
import { daemonLogger, parseListen, parsePositive, parseSize, printJson, untilSignal } from './common.ts';
import { table } from './render.ts';
import { VmferryError } from '../errors.ts';
import { addRbdOptions, backendOf, createRbdVolume, listRbdVolumes, removeRbdVolume, resizeRbdVolume, type RbdCliOptions } from './rbd-volumes.ts';
import { commandTls, daemonTls, insecureHelp } from './tls-options.ts';
import { tlsGlobals, withConfigFile } from './config-file.ts';

const MiB = 1024 * 1024;
const defaultStorageUrl = process.env.VMFERRY_STORAGE ?? 'http://127.0.0.1:10810';

/** The storage admin API with this command's certificate, if it has one; the server must show a storage certificate. */
function storageTls(command: Command): { tls: TlsIdentity | undefined; server: ExpectedServer } {
  return { tls: commandTls(command, 'client'), server: { role: 'storage' } };
}

export function registerStorageCommands(program: Command): void {
  const serve = program
    .command('storage')
    .description('the shared storage server')
    .command('serve')
    .description('serve shared volumes over NBD, with an admin HTTP API')
    .option('--data-dir <dir>', 'where volumes and the catalog live (required)')
    .option('--listen <host:port>', 'NBD over TCP', '127.0.0.1:10809')
    .option('--socket <path>', 'NBD over a unix socket as well')
    .option('--admin <host:port>', 'admin HTTP API', '127.0.0.1:10810')
    .option('--insecure', insecureHelp)
    .option('--memory-budget-mib <MiB>', 'memory all NBD clients together may hold for requests and unsent replies; past it, they are read more slowly', String(defaultLimits.memoryBudgetBytes / MiB));
  withConfigFile(serve, 'storage', { required: ['data-dir'], globals: tlsGlobals })
    .action(async (opts: { dataDir: string; listen: string; socket?: string; admin: string; memoryBudgetMib: string }, command: Command) => {
      const logger = daemonLogger('storage');
      const tls = daemonTls(command, 'storage', logger);
      // Loaded by the command that runs it, so the CLI's other commands start fast.
      const { StorageServer } = await import('../storage/server.ts');
      const server = await StorageServer.start({
        dataDir: opts.dataDir,
        logger,
        nbd: parseListen(opts.listen, '--listen'),
        admin: parseListen(opts.admin, '--admin'),
        memoryBudgetBytes: Math.round(parsePositive(opts.memoryBudgetMib, '--memory-budget-mib') * MiB),
        ...(opts.socket ? { socket: opts.socket } : {}),
        ...(tls ? { tls } : {}),
      });
      logger.info(server.addresses, 'storage server ready');
      const signal = await untilSignal();
      logger.info({ signal }, 'shutting down: draining NBD clients');
      await server.close();
    });

  const volume = program.command('volume').description('shared volumes on the storage server');
  const storageOption = ['--storage <url>', 'storage server admin URL (or VMFERRY_STORAGE)', defaultStorageUrl] as const;
  addRbdOptions(volume
    .command('create <name>')
    .description('create a shared volume')
    .requiredOption('--size <size>', 'size, e.g. 4G or 512M')
    .option('--read-only', 'export it read-only (nbd only; an RBD disk is made read-only in the VM)')
    .option(...storageOption))
    .action(async (name: string, opts: { size: string; readOnly?: boolean; storage: string } & RbdCliOptions, command: Command) => {
      const where = backendOf(opts);
      if (where.backend === 'rbd') {
        if (opts.readOnly) throw new VmferryError('VMF_INVALID_ARGUMENT', '--read-only is for --backend nbd: give the VM\'s disk readOnly instead');
        await createRbdVolume(name, opts.size, where, command);
        return;
      }
      const created = await requestJson<Volume>(opts.storage, 'POST', '/v1/volumes', {
        ...storageTls(command),
        body: { name, sizeBytes: parseSize(opts.size, '--size'), readOnly: opts.readOnly ?? false },
      });
      if (command.optsWithGlobals<{ json?: boolean }>().json) printJson(created);
      else console.log(`created volume ${created.name} (${formatBytes(created.sizeBytes)}${created.readOnly ? ', read-only' : ''})`);
    });
  addRbdOptions(volume
    .command('list')
    .description('list shared volumes and their clients')
    .option(...storageOption))
    .action(async (opts: { storage: string } & RbdCliOptions, command: Command) => {
      const where = backendOf(opts);
      if (where.backend === 'rbd') {
        await listRbdVolumes(where, command);
        return;
      }
      const volumes = await requestJson<Volume[]>(opts.storage, 'GET', '/v1/volumes', { ...storageTls(command) });
      if (command.optsWithGlobals<{ json?: boolean }>().json) printJson(volumes);
      else console.log(table(['volume', 'size', 'read-only', 'created', 'writer', 'clients'], volumes.map((v) => [v.name, formatBytes(v.sizeBytes), v.readOnly ? 'yes' : 'no', new Date(v.createdAt).toISOString(), writerOf(v), v.attachments.join(' ') || '-'])));
    });
  addRbdOptions(volume
    .command('resize <name>')
    .description('change a volume\'s size (new connections see it; an RBD image only grows)')
    .requiredOption('--size <size>', 'new size')
    .option(...storageOption))
    .action(async (name: string, opts: { size: string; storage: string } & RbdCliOptions, command: Command) => {
      const where = backendOf(opts);
      if (where.backend === 'rbd') {
        await resizeRbdVolume(name, opts.size, where);
        return;
      }
      const resized = await requestJson<Volume>(opts.storage, 'PATCH', `/v1/volumes/${encodeURIComponent(name)}`, { ...storageTls(command), body: { sizeBytes: parseSize(opts.size, '--size') } });
      console.log(`volume ${resized.name} is now ${formatBytes(resized.sizeBytes)}`);
    });
  addRbdOptions(volume
    .command('delete <name>')
    .alias('rm')
    .description('delete a volume (refused while clients are attached, a writer holds its lease, or a client may be reconnecting)')
    .option('--force', 'delete it anyway; clients still attached get I/O errors (an RBD image\'s clients are blocklisted)')
    .option(...storageOption))
    .action(async (name: string, opts: { force?: boolean; storage: string } & RbdCliOptions, command: Command) => {
      const where = backendOf(opts);
      if (where.backend === 'rbd') {
        await removeRbdVolume(name, opts.force ?? false, where);
        return;
      }
      await requestJson(opts.storage, 'DELETE', `/v1/volumes/${encodeURIComponent(name)}${opts.force ? '?force=true' : ''}`, { ...storageTls(command) });
      console.log(`deleted volume ${name}`);
    });

  const quarantine = volume.command('quarantine').description('volume files the server found without a catalog entry: kept until restored or purged');
  quarantine
    .command('list')
    .description('list quarantined files')
    .option(...storageOption)
    .action(async (opts: { storage: string }, command: Command) => {
      const files = await requestJson<QuarantinedFile[]>(opts.storage, 'GET', '/v1/quarantine', { ...storageTls(command) });
      if (command.optsWithGlobals<{ json?: boolean }>().json) printJson(files);
      else if (files.length === 0) console.log('nothing in quarantine');
      else console.log(table(['name', 'size', 'quarantined'], files.map((f) => [f.name, formatBytes(f.sizeBytes), new Date(f.quarantinedAt).toISOString()])));
    });
  quarantine
    .command('restore <name>')
    .description('make a quarantined file a volume of that name again (writable, with the file\'s size)')
    .option(...storageOption)
    .action(async (name: string, opts: { storage: string }, command: Command) => {
      const restored = await requestJson<Volume>(opts.storage, 'POST', `/v1/quarantine/${encodeURIComponent(name)}/restore`, { ...storageTls(command) });
      console.log(`restored volume ${restored.name} (${formatBytes(restored.sizeBytes)})`);
    });
  quarantine
    .command('purge <name>')
    .description('delete a quarantined file for good')
    .option(...storageOption)
    .action(async (name: string, opts: { storage: string }, command: Command) => {
      await requestJson(opts.storage, 'DELETE', `/v1/quarantine/${encodeURIComponent(name)}`, { ...storageTls(command) });
      console.log(`purged ${name} from quarantine`);
    });
}

/** A volume's writer lease as `volume list` shows it: its generation, and whether anyone holds it (never the token). */
function writerOf(volume: Volume): string {
  if (!volume.writer) return '-';
  return volume.writer.held ? `generation ${volume.writer.generation}` : `released (generation ${volume.writer.generation})`;
}

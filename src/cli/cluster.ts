/** CLI commands that talk to the controller: hosts, VMs, migrations. */
import { Option, type Command } from 'commander';
import type { CreateVmRequest, VmInfo } from '../api/agent-types.ts';
import type { HostStatus } from '../controller/inventory.ts';
import { parseNicArg } from './nic-arg.ts';
import { VmferryError } from '../errors.ts';
import { testGuestBoot } from '../guest/test-guest.ts';
import { defaultCpuModel } from '../qemu/cpu-models.ts';
import { cpuModelPattern, type DiskSource, type NbdServerAddress } from '../qemu/spec.ts';
import { defaultControllerUrl, parseListen, parsePositive, parseSize, printJson } from './common.ts';
import { ControllerClient } from '../controller/client.ts';
import { registerVmImport } from './import.ts';
import { commandTls } from './tls-options.ts';
import { followToReport, registerWatchCommand } from './watch.ts';
import { registerQuarantineCommands } from './quarantine.ts';
import { registerDrainCommands } from './drain.ts';
import { renderPlan, renderReport, table } from './render.ts';
import { addMigrateOptions, migrateRequestOptions, type MigrateCliOptions } from './migrate-options.ts';

const defaultStorageNbd = '127.0.0.1:10809';

/** `vm create`'s options as commander hands them over, parsed. */
interface VmCreateOptions {
  host: string;
  memory: number;
  vcpus: number;
  cpu?: string;
  localDisk: string[];
  sharedDisk: string[];
  roSharedDisk: string[];
  rbdDisk: string[];
  cephConf: string;
  cephUser: string;
  nic: string[];
  storageNbd: { host: string; port: number };
  kernel?: string;
  initrd?: string;
  append?: string;
  testGuest?: boolean;
  boot?: string;
}

interface GlobalOptions {
  controller: string;
  json?: boolean;
}

function client(command: Command): { api: ControllerClient; json: boolean } {
  const opts = command.optsWithGlobals<GlobalOptions>();
  return { api: new ControllerClient(opts.controller, commandTls(command, 'client')), json: opts.json ?? false };
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function parseDiskArg(value: string, flag: string): [string, string] {
  const at = value.indexOf(':');
  if (at <= 0 || at === value.length - 1) throw new VmferryError('VMF_INVALID_ARGUMENT', `${flag} must be ID:VALUE (got "${value}")`);
  return [value.slice(0, at), value.slice(at + 1)];
}

type LocalDiskRequest = NonNullable<CreateVmRequest['disks'][number]['local']>;

/** The value of --local-disk ID:VALUE: SIZE, import=FILE or base=VOLUME[:SIZE]. */
function parseLocalDisk(id: string, value: string, storage: NbdServerAddress): LocalDiskRequest {
  if (value.startsWith('import=')) {
    const file = value.slice('import='.length);
    if (!file.startsWith('/')) throw new VmferryError('VMF_INVALID_ARGUMENT', `--local-disk ${id}:import= needs an absolute path on the VM's host (got "${file}")`);
    return { import: file };
  }
  if (value.startsWith('base=')) {
    const [volume = '', size] = value.slice('base='.length).split(':');
    if (volume === '') throw new VmferryError('VMF_INVALID_ARGUMENT', `--local-disk ${id}:base= needs a shared volume name`);
    return { base: volume, baseServer: storage, ...(size === undefined ? {} : { sizeBytes: parseSize(size, `--local-disk ${id}:base=${volume}:SIZE`) }) };
  }
  return { sizeBytes: parseSize(value, `--local-disk ${id}`) };
}

export function registerClusterCommands(program: Command): void {
  program.option('--controller <urls>', 'controller URL, or several separated by commas: requests go to whichever leads (or VMFERRY_CONTROLLER)', defaultControllerUrl).option('--json', 'machine-readable output');

  const host = program.command('host').description('hosts of the cluster');
  host
    .command('list')
    .description('list hosts and whether their agents report')
    .action(async (_opts, command: Command) => {
      const { api, json } = client(command);
      const hosts = await api.hosts();
      if (json) printJson(hosts);
      else {
        const rows = hosts.map((h) => [h.id, h.draining ? `${h.state}, draining` : h.state, h.url, h.address, accelColumn(h), `${Math.round((Date.now() - h.lastSeen) / 1000)} s ago`]);
        console.log(table(['host', 'state', 'agent', 'address', 'accelerator', 'last seen'], rows));
      }
    });
  registerQuarantineCommands(host);
  registerDrainCommands(host);

  const vm = program.command('vm').description('virtual machines');
  vm.command('list')
    .description('list VMs on every reachable host')
    .action(async (_opts, command: Command) => {
      const { api, json } = client(command);
      const vms = await api.vms();
      if (json) printJson(vms);
      else console.log(table(['vm', 'host', 'state', 'memory', 'disks'], vms.map((v) => [v.name, v.host, vmState(v), `${v.spec.memoryMiB} MiB`, v.spec.disks.map((d) => `${d.id}:${diskPlace(d.source)}`).join(' ')])));
    });
  vm.command('show <name>')
    .description('show one VM and its spec')
    .action(async (name: string, _opts, command: Command) => {
      const { api } = client(command);
      console.log(JSON.stringify(await api.vm(name), null, 2));
    });
  vm.command('create <name>')
    .description('create a VM on a host (its local disks are created in the host\'s pool)')
    .requiredOption('--host <host>', 'host to create it on')
    .addOption(new Option('--memory <MiB>', 'memory in MiB').argParser((v) => parsePositive(v, '--memory')).default(256))
    .addOption(new Option('--vcpus <n>', 'virtual CPUs').argParser((v) => parsePositive(v, '--vcpus')).default(1))
    .option('--cpu <model>', `QEMU CPU model, the same on every host it moves to (default ${defaultCpuModel}; e.g. Westmere-v1 for x86-64-v2 guests)`)
    .option(
      '--local-disk <spec>',
      'a local disk in the host\'s pool (repeatable): ID:SIZE empty (root:1G), ID:import=FILE a copy of an image file on that host (qcow2 or raw), ID:base=VOLUME[:SIZE] a qcow2 overlay on a shared volume, read-only',
      collect,
      [],
    )
    .option('--shared-disk <id:volume>', 'a shared volume on the storage server (repeatable)', collect, [])
    .option('--ro-shared-disk <id:volume>', 'a read-only shared volume (repeatable)', collect, [])
    .option('--rbd-disk <id:pool/image>', 'a shared RBD image on the Ceph cluster --ceph-conf names (repeatable)', collect, [])
    .option('--ceph-conf <path>', 'the Ceph conf file every host has; it names the monitors and the keyring (or VMFERRY_CEPH_CONF)', process.env.VMFERRY_CEPH_CONF ?? '/etc/ceph/ceph.conf')
    .option('--ceph-user <name>', 'the Ceph user, without "client." (or VMFERRY_CEPH_USER)', process.env.VMFERRY_CEPH_USER ?? 'admin')
    .option('--nic <bridge=BR[,mac=MAC]>', 'a virtio-net NIC on host bridge BR; the MAC is generated (52:54:00:…) unless given (repeatable)', collect, [])
    .addOption(
      new Option('--storage-nbd <host:port>', 'NBD address of the storage server')
        .argParser((v) => parseListen(v, '--storage-nbd'))
        .default(parseListen(defaultStorageNbd, '--storage-nbd'), defaultStorageNbd),
    )
    .option('--kernel <path>', 'boot this kernel (direct kernel boot)')
    .option('--initrd <path>', 'initrd for --kernel')
    .option('--append <cmdline>', 'kernel command line for --kernel')
    .option('--test-guest', 'boot vmferry\'s test guest from this checkout\'s build/guest (the agent must trust that directory and see it at the same path), writing checkable records to every disk')
    .option('--boot <disk:ID>', 'boot from disk ID with the BIOS (its boot loader), e.g. disk:root')
    .action(async (name: string, opts: VmCreateOptions, command: Command) => {
      const { api, json } = client(command);
      const server = { type: 'inet' as const, host: opts.storageNbd.host, port: opts.storageNbd.port };
      const disks: CreateVmRequest['disks'] = [
        ...opts.localDisk.map((arg) => {
          const [id, value] = parseDiskArg(arg, '--local-disk');
          return { id, local: parseLocalDisk(id, value, server) };
        }),
        ...opts.sharedDisk.map((arg) => {
          const [id, volume] = parseDiskArg(arg, '--shared-disk');
          return { id, shared: { server, export: volume } };
        }),
        ...opts.roSharedDisk.map((arg) => {
          const [id, volume] = parseDiskArg(arg, '--ro-shared-disk');
          return { id, shared: { server, export: volume }, readOnly: true };
        }),
        ...opts.rbdDisk.map((arg) => {
          const [id, image] = parseDiskArg(arg, '--rbd-disk');
          const [pool, name, extra] = image.split('/');
          if (!pool || !name || extra !== undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', `--rbd-disk ${arg}: give ID:POOL/IMAGE`);
          return { id, rbd: { pool, image: name, conf: opts.cephConf, user: opts.cephUser } };
        }),
      ];
      const bootChoices = [opts.testGuest && '--test-guest', typeof opts.kernel === 'string' && '--kernel', typeof opts.boot === 'string' && '--boot'].filter(Boolean);
      if (bootChoices.length > 1) throw new VmferryError('VMF_INVALID_ARGUMENT', `say what to boot once: ${bootChoices.join(' and ')} were both given`);
      let boot: CreateVmRequest['boot'];
      let serialPorts: number | undefined;
      if (opts.testGuest) ({ boot, serialPorts } = testGuestBoot());
      else if (typeof opts.kernel === 'string') {
        boot = { kind: 'kernel', kernel: opts.kernel };
        if (typeof opts.initrd === 'string') boot.initrd = opts.initrd;
        if (typeof opts.append === 'string') boot.append = opts.append;
      } else if (typeof opts.boot === 'string') {
        const diskId = /^disk:(.+)$/.exec(opts.boot)?.[1];
        if (diskId === undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', `--boot must be disk:ID (got "${opts.boot}")`);
        if (!disks.some((d) => d.id === diskId)) throw new VmferryError('VMF_INVALID_ARGUMENT', `--boot disk:${diskId} names no disk of this VM`);
        boot = { kind: 'disk', diskId };
      } else throw new VmferryError('VMF_INVALID_ARGUMENT', 'say what to boot: --test-guest, --kernel PATH or --boot disk:ID');
      const created = await api.createVm(opts.host, {
        name,
        memoryMiB: opts.memory,
        vcpus: opts.vcpus,
        ...(typeof opts.cpu === 'string' ? { cpu: parseCpuModel(opts.cpu) } : {}),
        boot,
        disks,
        ...(opts.nic.length ? { nics: opts.nic.map(parseNicArg) } : {}),
        ...(serialPorts === undefined ? {} : { serialPorts }),
      });
      if (json) printJson(created);
      else console.log(`created VM ${created.name} on ${created.host}`);
    });
  registerVmImport(vm);
  vm.command('start <name>')
    .description('start a VM')
    .action(async (name: string, _opts, command: Command) => {
      const { api, json } = client(command);
      const info = await api.startVm(name);
      if (json) printJson(info);
      else console.log(`VM ${name} ${info.state} on ${info.host} (pid ${info.pid})`);
    });
  vm.command('stop <name>')
    .description('stop a VM (ACPI power-off, then quit)')
    .option('--force', 'kill QEMU at once')
    .action(async (name: string, opts: { force?: boolean }, command: Command) => {
      const { api, json } = client(command);
      const info = await api.stopVm(name, opts.force ?? false);
      if (json) printJson(info);
      else console.log(`VM ${name} ${info.state} on ${info.host}`);
    });
  vm.command('rm <name>')
    .description('delete a stopped VM and its local disks')
    .action(async (name: string, _opts, command: Command) => {
      const { api, json } = client(command);
      await api.deleteVm(name);
      if (json) printJson({ deleted: name });
      else console.log(`deleted VM ${name}`);
    });

  addMigrateOptions(program.command('migrate <vm>').description('live-migrate a VM: local disks are mirrored, shared volumes re-attached, RAM streamed'))
    .action(async (vmName: string, opts: MigrateCliOptions, command: Command) => {
      const { api, json } = client(command);
      if (opts.allowPostcopy && opts.ramMode === 'stop-and-copy') {
        throw new VmferryError('VMF_INVALID_ARGUMENT', '--allow-postcopy switches a live migration to post-copy; it does not go with --ram-mode stop-and-copy');
      }
      const request = { vm: vmName, to: opts.to, dryRun: opts.dryRun === true, ...migrateRequestOptions(opts) };
      const result = await api.migrate(request);
      if (!result.id) {
        if (json) printJson({ plan: result.plan });
        else console.log(renderPlan(result.plan));
        return;
      }
      // --json: the plan first (with the id a script may cancel by), then the events as they come, the report last.
      if (json) printJson({ id: result.id, plan: result.plan });
      else console.log(`migration ${result.id} started\n${renderPlan(result.plan)}`);
      await followToReport(api, result.id, json);
    });

  const migration = program.command('migration').description('migration records');
  migration
    .command('list')
    .description('recent migrations')
    .action(async (_opts, command: Command) => {
      const { api, json } = client(command);
      const records = await api.migrations();
      if (json) printJson(records);
      else {
        console.log(
          table(
            ['id', 'vm', 'from', 'to', 'phase', 'started', 'pause', 'downtime (QEMU)'],
            records.map((r) => [r.id, r.vm, r.from, r.to, r.phase, new Date(r.createdAt).toISOString(), r.report?.pauseMs === undefined ? '' : `${r.report.pauseMs} ms`, r.report?.downtimeMs === undefined ? '' : `${r.report.downtimeMs} ms`]),
          ),
        );
        for (const r of records.filter((r) => r.phase === 'unresolved')) console.log(`unresolved ${r.id}: ${r.report?.error?.message ?? 'waiting for the destination to answer'}`);
      }
    });
  migration
    .command('show <id>')
    .description('one migration with its plan and report')
    .action(async (id: string, _opts, command: Command) => {
      const { api, json } = client(command);
      const record = await api.migration(id);
      if (json) printJson(record);
      else console.log([`migration ${record.id}: ${record.vm} ${record.from} → ${record.to}, ${record.phase}`, renderPlan(record.plan), record.report ? renderReport(record.report) : '(running)'].join('\n'));
    });
  registerWatchCommand(migration);
  migration
    .command('resolve <id>')
    .description("settle an unresolved migration whose destination cannot tell whether the guest ran there: the guest runs on the host chosen")
    .requiredOption('--run-on <host>', "the source (its paused guest resumes; what the guest may have done on the destination is lost) or the destination (the VM is kept there stopped, to start as after a crash; the source's RAM is discarded)")
    .action(async (id: string, opts: { runOn: string }, command: Command) => {
      const { api, json } = client(command);
      const record = await api.resolve(id, opts.runOn);
      if (json) printJson(record);
      else console.log(`migration ${record.id} ${record.phase}: ${record.report?.recovery ?? ''}`);
    });
  migration
    .command('cancel <id>')
    .description('cancel a running migration (the VM stays on the source)')
    .action(async (id: string, _opts, command: Command) => {
      const { api, json } = client(command);
      const record = await api.cancel(id);
      if (json) printJson(record);
      else console.log(`cancel requested for migration ${id} (${record.phase})`);
    });
}

function parseCpuModel(text: string): string {
  if (!cpuModelPattern.test(text)) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `--cpu must be a QEMU CPU model name such as Westmere-v1, without features or options (got "${text}")`);
  }
  return text;
}

/** A host's accelerator with why it was chosen: "tcg (KVM unusable: …)". */
function accelColumn(host: HostStatus): string {
  if (!host.accelerator) return 'unknown (agent too old to report it)';
  return host.acceleratorReason ? `${host.accelerator} (${host.acceleratorReason})` : host.accelerator;
}

/** A VM's state for people: a migration that holds it, and why when it is unresolved. */
function vmState(vm: VmInfo): string {
  if (vm.migration?.phase === 'unresolved') return `${vm.state} (migration ${vm.migration.id} unresolved: ${vm.migration.reason ?? 'waiting for the destination'})`;
  return vm.migrating ? `${vm.state} (migrating)` : vm.state;
}

/** Where a disk's data lives, as `vm list` shows it. */
function diskPlace(source: DiskSource): string {
  if (source.kind === 'nbd') return 'shared';
  if (source.kind === 'rbd') return `rbd ${source.pool}/${source.image}`;
  return source.backing ? `local on ${source.backing.export}` : 'local';
}

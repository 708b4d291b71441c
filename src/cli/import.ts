/** `vmferry vm import`: a VM from a libvirt domain definition, through the controller like `vm create`. */
import { readFile } from 'node:fs/promises';
import type { Command } from 'commander';
import { VmferryError } from '../errors.ts';
import type { LibvirtImport } from '../import/libvirt.ts';
import { qemuMachineTypes } from '../qemu/machines.ts';
import { parseListen, printJson } from './common.ts';
import { ControllerClient } from '../controller/client.ts';

interface ImportOptions {
  libvirtXml: string;
  host: string;
  name?: string;
  storageNbd: string;
  dryRun?: boolean;
}

async function readXml(path: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `--libvirt-xml ${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`, { cause: err });
  }
}

function renderFindings(result: LibvirtImport): string {
  const lines: string[] = [];
  if (result.notCarried.length === 0) lines.push('Everything in the domain was carried over.');
  else {
    lines.push(`Not carried over (${result.notCarried.length}):`);
    for (const item of result.notCarried) lines.push(`  - ${item.what}`, `      ${item.why}`);
  }
  if (result.ignored.length > 0) lines.push(`Ignored, vmferry has its own (${result.ignored.length}):`, ...result.ignored.map((item) => `  - ${item}`));
  return lines.join('\n');
}

export function registerVmImport(vm: Command): void {
  vm.command('import')
    .description('create a VM from a libvirt domain definition (virsh dumpxml); lists what it cannot carry over')
    .requiredOption('--libvirt-xml <file>', 'the domain\'s XML, as `virsh dumpxml NAME` prints it')
    .requiredOption('--host <host>', 'host to create it on (its disk files are imported there)')
    .option('--name <name>', 'the VM\'s name in vmferry (default: the domain\'s <name>)')
    .option('--storage-nbd <host:port>', 'NBD address of the storage server: NBD disks there become shared disks', '127.0.0.1:10809')
    .option('--dry-run', 'print the request and what is not carried over, and create nothing')
    .action(async (opts: ImportOptions, command: Command) => {
      const globals = command.optsWithGlobals<{ controller: string; json?: boolean }>();
      const storage = parseListen(opts.storageNbd, '--storage-nbd');
      // The XML reader (fast-xml-parser) is loaded by the command that reads XML, so the others start without it.
      const { fromLibvirtXml } = await import('../import/libvirt.ts');
      const result = fromLibvirtXml(await readXml(opts.libvirtXml), {
        storage: { type: 'inet', host: storage.host, port: storage.port },
        // The versioned machine type is kept when the QEMU here knows it; hosts of a cluster run the same QEMU.
        machines: await qemuMachineTypes(),
        ...(opts.name !== undefined ? { name: opts.name } : {}),
        source: opts.libvirtXml,
      });
      if (opts.dryRun) {
        if (globals.json) printJson({ host: opts.host, request: result.request, notCarried: result.notCarried, ignored: result.ignored });
        else console.log([`Would create VM ${result.request.name} on ${opts.host} (dry run: nothing created):`, JSON.stringify(result.request, null, 2), renderFindings(result)].join('\n'));
        return;
      }
      const created = await new ControllerClient(globals.controller).createVm(opts.host, result.request);
      if (globals.json) printJson({ created, notCarried: result.notCarried, ignored: result.ignored });
      else console.log(`created VM ${created.name} on ${created.host} from ${opts.libvirtXml}\n${renderFindings(result)}`);
    });
}

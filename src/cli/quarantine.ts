/** `vmferry host quarantine …`: what a host's agent moved aside instead of deleting (at start, or by an operator's resolve), through the controller. */
import type { Command } from 'commander';
import { formatBytes } from '../util/format.ts';
import { printJson } from './common.ts';
import { ControllerClient } from '../controller/client.ts';
import { commandTls } from './tls-options.ts';
import { table } from './render.ts';

function client(command: Command): { api: ControllerClient; json: boolean } {
  const opts = command.optsWithGlobals<{ controller: string; json?: boolean }>();
  return { api: new ControllerClient(opts.controller, commandTls(command, 'client')), json: opts.json ?? false };
}

export function registerQuarantineCommands(host: Command): void {
  const quarantine = host.command('quarantine').description("files an agent moved aside instead of deleting: what it could not account for at start, a source's disks left by migration resolve");
  quarantine
    .command('list <host>')
    .description('list quarantine entries: what, from where, and why')
    .action(async (hostId: string, _opts, command: Command) => {
      const { api, json } = client(command);
      const entries = await api.quarantine(hostId);
      if (json) printJson(entries);
      else if (entries.length === 0) console.log(`host ${hostId} has nothing in quarantine`);
      else {
        const rows = entries.flatMap((e) => e.items.map((item, i) => [i === 0 ? e.id : '', item.from, item.sizeBytes === null ? 'missing' : formatBytes(item.sizeBytes), i === 0 ? `${new Date(e.at).toISOString()}: ${e.reason}` : '']));
        console.log(table(['id', 'file', 'size', 'why'], rows));
      }
    });
  quarantine
    .command('restore <host> <id>')
    .description('move an entry\'s files back where they came from (refused if anything is there now)')
    .action(async (hostId: string, id: string, _opts, command: Command) => {
      const { api, json } = client(command);
      const entry = await api.restoreQuarantined(hostId, id);
      if (json) printJson(entry);
      else console.log(`restored ${id} on ${hostId}: ${entry.items.map((item) => item.from).join(', ')}`);
    });
  quarantine
    .command('purge <host> <id>')
    .description('delete an entry and its files for good')
    .action(async (hostId: string, id: string, _opts, command: Command) => {
      const { api, json } = client(command);
      await api.purgeQuarantined(hostId, id);
      if (json) printJson({ purged: id });
      else console.log(`purged ${id} on ${hostId}`);
    });
}

/**
 * Following a migration from the terminal: `vmferry migrate` does it after
 * starting one, `vmferry migration watch ID` re-attaches to one already
 * running (or shows the report of one that ended). With --json, one JSON line
 * per event while it runs, and last the same `{"id","report"}` line as ever.
 */
import type { Command } from 'commander';
import { ControllerClient } from '../controller/client.ts';
import { printJson } from './common.ts';
import { followMigration } from './progress.ts';
import { renderReport } from './render.ts';
import { commandTls } from './tls-options.ts';

/** Follows migration `id` to its report and prints it; a migration that did not complete sets exit code 1. */
export async function followToReport(api: ControllerClient, id: string, json: boolean): Promise<void> {
  const report = await followMigration(api, id, json ? 'ndjson' : process.stdout.isTTY ? 'bars' : 'plain');
  if (json) printJson({ id, report });
  else console.log(renderReport(report));
  if (report.outcome !== 'completed') process.exitCode = 1;
}

export function registerWatchCommand(migration: Command): void {
  migration
    .command('watch <id>')
    .description('follow a migration live (progress bars; --json: one JSON line per event) until its report, which it prints')
    .action(async (id: string, _opts, command: Command) => {
      const opts = command.optsWithGlobals<{ controller: string; json?: boolean }>();
      const api = new ControllerClient(opts.controller, commandTls(command, 'client'));
      const record = await api.migration(id);
      if (!opts.json) console.log(`migration ${record.id}: ${record.vm} ${record.from} → ${record.to}, ${record.phase}`);
      await followToReport(api, id, opts.json ?? false);
    });
}

/**
 * `vmferry demo`'s command line. Its work (demo-run.ts) starts a whole cluster
 * in-process, so it is loaded only when the demo runs: every other command
 * starts without loading the daemons' code.
 */
import type { Command } from 'commander';

export function registerDemoCommand(program: Command): void {
  program
    .command('demo')
    .description('run a two-host cluster here, migrate a writing VM there and back, verify every acknowledged write')
    .option('--loopback', 'use loopback addresses even as root (no network namespaces)')
    .option('--insecure', 'run the cluster without TLS (its daemons with --insecure), to compare')
    .action(async (opts: { loopback?: boolean; insecure?: boolean }, command: Command) => {
      const { runDemoCommand } = await import('./demo-run.ts');
      await runDemoCommand(opts, command.optsWithGlobals<{ json?: boolean }>().json ?? false);
    });
}

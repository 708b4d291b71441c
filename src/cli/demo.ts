/**
 * `vmferry demo`'s command line. Its work (demo-run.ts) starts a whole cluster
 * in-process, so it is loaded only when the demo runs: every other command
 * starts without loading the daemons' code.
 */
import { Option, type Command } from 'commander';

const demoStorages = ['nbd', 'ceph'] as const;

export function registerDemoCommand(program: Command): void {
  program
    .command('demo')
    .description('run a two-host cluster here, migrate a writing VM there and back, verify every acknowledged write')
    .option('--loopback', 'use loopback addresses even as root (no network namespaces)')
    .option('--insecure', 'run the cluster without TLS (its daemons with --insecure), to compare')
    .option('--ha', 'two controllers on a throwaway PostgreSQL; the leader is killed during the first migration and the standby takes over')
    .addOption(
      new Option('--storage <backend>', 'where the shared disk lives: a volume of vmferry\'s storage server (nbd), or an RBD image on a throwaway one-OSD Ceph cluster (ceph)')
        .choices(demoStorages)
        .default('nbd'),
    )
    .action(async (opts: { loopback?: boolean; insecure?: boolean; ha?: boolean; storage: (typeof demoStorages)[number] }, command: Command) => {
      const { runDemoCommand } = await import('./demo-run.ts');
      await runDemoCommand(opts, command.optsWithGlobals<{ json?: boolean }>().json ?? false);
    });
}

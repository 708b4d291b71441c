/**
 * `vmferry dashboard`: the controller's web dashboard for a browser that holds no client certificate, through a
 * proxy on loopback (dashboard-proxy.ts, loaded only when the command runs: every other command starts faster).
 */
import type { Command } from 'commander';
import { VmferryError } from '../errors.ts';
import { parseListen, untilSignal } from './common.ts';
import { commandTls } from './tls-options.ts';

export function registerDashboardCommand(program: Command): void {
  program
    .command('dashboard')
    .description("open the controller's web dashboard in a browser without the cluster's certificates: a proxy on loopback that presents yours")
    .option('--listen <host:port>', 'where the proxy listens (loopback only)', '127.0.0.1:0')
    .action(async (opts: { listen: string }, command: Command) => {
      const listen = parseListen(opts.listen, '--listen');
      if (!/^(127\.\d+\.\d+\.\d+|::1|localhost)$/.test(listen.host)) {
        throw new VmferryError('VMF_INVALID_ARGUMENT', `--listen must be a loopback address (got "${listen.host}"): the proxy acts with your operator certificate`);
      }
      const { controller } = command.optsWithGlobals<{ controller: string }>();
      const { startDashboardProxy } = await import('./dashboard-proxy.ts');
      const proxy = await startDashboardProxy({ controllerUrl: controller, tls: commandTls(command, 'client'), listen });
      console.log(`vmferry dashboard for ${controller}: open ${proxy.url}\n(Ctrl-C stops it)`);
      await untilSignal();
      await proxy.close();
    });
}

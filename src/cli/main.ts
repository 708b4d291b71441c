/**
 * The `vmferry` command. Each area registers its own subcommands; this file only
 * wires them together and turns a thrown VmferryError into one clear line and a
 * non-zero exit.
 */
import { Command, CommanderError } from 'commander';
import { VmferryError, describeError } from '../errors.ts';
import { registerClusterCommands } from './cluster.ts';
import { registerDashboardCommand } from './dashboard.ts';
import { registerDaemonCommands } from './daemons.ts';
import { registerStorageCommands } from './storage.ts';
import { registerDemoCommand } from './demo.ts';
import { registerPkiCommands } from './pki.ts';
import { registerTlsOptions } from './tls-options.ts';
import { vmferryVersion } from '../version.ts';

const program = new Command('vmferry')
  .description(`Live-migrate QEMU/KVM virtual machines whose disks are partly local, partly shared (vmferry ${vmferryVersion})`)
  .version(vmferryVersion, '-V, --version', 'print vmferry\'s version')
  .showHelpAfterError()
  .exitOverride();

// Subcommand registrations go here, one line per area.
registerDaemonCommands(program);
registerClusterCommands(program);
registerDashboardCommand(program);
registerStorageCommands(program);
registerDemoCommand(program);
registerPkiCommands(program);
registerTlsOptions(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) process.exit(err.exitCode);
  const code = err instanceof VmferryError ? ` [${err.code}]` : '';
  console.error(`vmferry: ${describeError(err)}${code}`);
  process.exit(1);
}

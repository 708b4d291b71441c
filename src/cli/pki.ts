/** `vmferry pki init` and `vmferry pki issue`: the cluster's certificate authority (security/pki.ts, docs/SECURITY.md). */
import type { Command } from 'commander';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';
import { isRole, roles } from '../security/identity.ts';
import { defaultCertificateDays, initCa, issueCertificate } from '../security/pki.ts';
import { printJson } from './common.ts';

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export function registerPkiCommands(program: Command): void {
  const pki = program.command('pki').description('the cluster\'s certificate authority: certificates for the controller, agents, storage and operators');
  pki
    .command('init')
    .description('create the cluster CA (ca-cert.pem, and ca-key.pem which never leaves DIR)')
    .requiredOption('--dir <dir>', 'where the CA and the identities it issues live')
    .option('--force', 'replace an existing CA (every certificate it issued stops working)')
    .action(async (opts: { dir: string; force?: boolean }, command: Command) => {
      const { cert } = await initCa(opts.dir, { force: opts.force ?? false });
      if (command.optsWithGlobals<{ json?: boolean }>().json) printJson({ caCert: cert });
      else console.log(`created the cluster CA: ${cert} (its key, ${join(opts.dir, 'ca-key.pem')}, stays here)`);
    });
  pki
    .command('issue <role> [id]')
    .description(`issue a certificate; ROLE is one of ${roles.join(', ')}; ID is the host id of an agent, the user name of an operator (default: the role)`)
    .requiredOption('--dir <dir>', 'the directory of `pki init`')
    .option('--address <ip-or-name>', 'an address the server is reached at, put in its certificate (repeatable; default 127.0.0.1)', collect, [])
    .option('--days <n>', 'validity in days', String(defaultCertificateDays))
    .option('--force', 'replace an identity issued before (a rotation: new key and certificate)')
    .action(async (role: string, id: string | undefined, opts: { dir: string; address: string[]; days: string; force?: boolean }, command: Command) => {
      if (!isRole(role)) throw new VmferryError('VMF_INVALID_ARGUMENT', `ROLE must be one of ${roles.join(', ')} (got "${role}")`);
      if (id === undefined && (role === 'agent' || role === 'operator')) throw new VmferryError('VMF_INVALID_ARGUMENT', `an ${role} certificate needs an ID: ${role === 'agent' ? 'the host id' : 'the user name'}`);
      const days = Number(opts.days);
      const issued = await issueCertificate(opts.dir, { role, id: id ?? role, addresses: opts.address, days, force: opts.force ?? false });
      if (command.optsWithGlobals<{ json?: boolean }>().json) printJson(issued);
      else console.log(`issued ${role} ${id ?? role}: ${issued.dir} (${issued.files.join(', ')}); use it with --pki-dir ${issued.dir}`);
    });
}

/**
 * The TLS options every vmferry command shares: a daemon serves with them, a
 * client command presents them (docs/SECURITY.md). Global options, so they
 * read the same before or after the subcommand.
 */
import type { Command } from 'commander';
import type { Logger } from 'pino';
import { VmferryError } from '../errors.ts';
import { loadTlsIdentity, type TlsIdentity } from '../security/tls-files.ts';

interface TlsOptions {
  cert?: string;
  key?: string;
  ca?: string;
  pkiDir?: string;
}

export function registerTlsOptions(program: Command): void {
  program
    .option('--cert <file>', 'this process\'s certificate, PEM (or VMFERRY_CERT)', process.env.VMFERRY_CERT)
    .option('--key <file>', 'its private key, PEM (or VMFERRY_KEY)', process.env.VMFERRY_KEY)
    .option('--ca <file>', 'the cluster CA\'s certificate, PEM (or VMFERRY_CA)', process.env.VMFERRY_CA)
    .option('--pki-dir <dir>', 'an identity directory from `vmferry pki issue`, instead of --cert/--key/--ca (or VMFERRY_PKI_DIR)', process.env.VMFERRY_PKI_DIR);
}

/** The identity the options name (undefined: plain HTTP); a daemon takes its server files from --pki-dir, a client its client files. */
export function commandTls(command: Command, end: 'server' | 'client'): TlsIdentity | undefined {
  const { cert, key, ca, pkiDir } = command.optsWithGlobals<TlsOptions>();
  return loadTlsIdentity({ cert, key, ca, pkiDir }, end);
}

/** The help of `--insecure`, on every daemon: the one way to serve without certificates. */
export const insecureHelp = 'serve without TLS and without authentication: anyone who reaches a port controls this daemon (docs/SECURITY.md)';

/**
 * A daemon's identity. Secure by default: without certificates a daemon does
 * not start unless told `--insecure`, and then it says so at every start.
 */
export function daemonTls(command: Command, daemon: 'agent' | 'controller' | 'storage', logger: Logger): TlsIdentity | undefined {
  const { cert, key, ca, pkiDir, insecure } = command.optsWithGlobals<TlsOptions & { insecure?: boolean }>();
  if (insecure) {
    if ([cert, key, ca, pkiDir].some((option) => option !== undefined)) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `--insecure and certificates (--pki-dir or --cert/--key/--ca) were both given to vmferry ${daemon}: choose one`);
    }
    logger.warn(`INSECURE: vmferry ${daemon} runs without TLS (--insecure): no authentication on its API${daemon === 'controller' ? '' : ' or its data streams'}; anyone who reaches its ports controls it and reads what it serves`);
    return undefined;
  }
  const identity = loadTlsIdentity({ cert, key, ca, pkiDir }, 'server');
  if (identity) return identity;
  throw new VmferryError(
    'VMF_INVALID_ARGUMENT',
    `vmferry ${daemon} serves only with the cluster's certificates: give --pki-dir DIR (made by \`vmferry pki issue ${daemon}${daemon === 'agent' ? ' HOST_ID' : ''} --dir PKI\`) or --cert/--key/--ca; ` +
      '--insecure serves with no TLS and no authentication instead (docs/SECURITY.md)',
  );
}

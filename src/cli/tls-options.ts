/**
 * The TLS options every vmferry command shares: a daemon serves with them, a
 * client command presents them (docs/SECURITY.md). Global options, so they
 * read the same before or after the subcommand.
 */
import type { Command } from 'commander';
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

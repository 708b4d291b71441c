/**
 * A process's TLS identity: its certificate and key, and the cluster CA it
 * trusts, read once at start from PEM files (`--cert/--key/--ca`) or from an
 * identity directory made by `vmferry pki issue` (`--pki-dir`). Read
 * synchronously: only at a daemon's or a command's start.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';
import { identityFiles } from './pki.ts';

/** PEM text. The same object is passed around, so HTTP clients can share connections per identity. */
export interface TlsIdentity {
  ca: string;
  cert: string;
  key: string;
}

export interface TlsFileOptions {
  cert?: string;
  key?: string;
  ca?: string;
  pkiDir?: string;
}

function readPem(path: string, what: string, hint = ''): string {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `cannot read the ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}${hint}`, { cause: err });
  }
  if (!text.includes('-----BEGIN ')) throw new VmferryError('VMF_INVALID_ARGUMENT', `the ${what} ${path} is not a PEM file`);
  return text;
}

/**
 * The identity the options name, or undefined when they name none (plain HTTP).
 * `end` picks the files of an identity directory: a daemon serves with its
 * server certificate, a command-line client presents its client certificate.
 */
export function loadTlsIdentity(options: TlsFileOptions, end: 'server' | 'client'): TlsIdentity | undefined {
  const { pkiDir } = options;
  const given = [options.cert, options.key, options.ca].filter((v) => v !== undefined).length;
  if (pkiDir !== undefined && given > 0) throw new VmferryError('VMF_INVALID_ARGUMENT', 'give either --pki-dir or --cert/--key/--ca, not both');
  if (pkiDir !== undefined) {
    const [certName, keyName] = end === 'server' ? [identityFiles.serverCert, identityFiles.serverKey] : [identityFiles.clientCert, identityFiles.clientKey];
    // An operator's directory has no server files, a storage server's no client files.
    const hint = ` (--pki-dir must be an identity directory from vmferry pki issue, of a role that acts as a ${end} here)`;
    return {
      ca: readPem(join(pkiDir, identityFiles.ca), 'CA certificate', hint),
      cert: readPem(join(pkiDir, certName), `${end} certificate`, hint),
      key: readPem(join(pkiDir, keyName), `${end} key`, hint),
    };
  }
  if (given === 0) return undefined;
  if (!options.cert || !options.key || !options.ca) throw new VmferryError('VMF_INVALID_ARGUMENT', '--cert, --key and --ca go together: give all three');
  return {
    ca: readPem(options.ca, 'CA certificate'),
    cert: readPem(options.cert, 'certificate'),
    key: readPem(options.key, 'key'),
  };
}

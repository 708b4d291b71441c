/**
 * The cluster's own certificate authority: `vmferry pki init` makes it,
 * `vmferry pki issue ROLE ID` gives a controller, an agent, the storage server
 * or an operator a key and a certificate naming its role and id (identity.ts).
 *
 * Certificates are made by Debian's `openssl` command, not an npm library:
 * it is the tool administrators already trust and can check the result with,
 * it adds no dependency tree (the JavaScript X.509 libraries need a global
 * Reflect polyfill), and issuing is rare, so a process per certificate costs
 * nothing that matters. Keys are made by Node (P-256, PKCS#8) and written
 * 0600 before any other process sees them; GnuTLS, and so QEMU, reads them.
 *
 * Each identity gets a directory laid out as QEMU's tls-creds-x509 `dir=`
 * expects (ca-cert.pem, server-cert.pem/server-key.pem, client-cert.pem/
 * client-key.pem), so the data streams can use the same files later.
 */
import { generateKeyPair, randomBytes } from 'node:crypto';
import { chmod, mkdir, mkdtemp, rename, rm, stat, writeFile, copyFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { VmferryError } from '../errors.ts';
import { runProgram } from '../util/run.ts';
import { identityIdPattern, identityUri, type Role } from './identity.ts';

/** Files of the CA in the PKI directory; ca-key.pem never leaves it. */
export const caFiles = { cert: 'ca-cert.pem', key: 'ca-key.pem' } as const;
/** QEMU's names (crypto/tlscredsx509.h), used for every identity directory. */
export const identityFiles = {
  ca: 'ca-cert.pem',
  serverCert: 'server-cert.pem',
  serverKey: 'server-key.pem',
  clientCert: 'client-cert.pem',
  clientKey: 'client-key.pem',
} as const;

/** Which ends of a TLS connection each role plays: what its certificate may be used for. */
const endpoints: Record<Role, { server: boolean; client: boolean }> = {
  controller: { server: true, client: true },
  agent: { server: true, client: true },
  storage: { server: true, client: false },
  operator: { server: false, client: true },
};

const caDays = 3650;
export const defaultCertificateDays = 365;

const dnsName = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

async function writeKey(path: string): Promise<void> {
  const { privateKey } = await promisify(generateKeyPair)('ec', { namedCurve: 'P-256' });
  await writeFile(path, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600, flag: 'wx' });
}

function serial(): string {
  return `0x${randomBytes(16).toString('hex')}`;
}

/** An openssl configuration holding only the extensions asked for: nothing from the system's openssl.cnf leaks in. */
function opensslConfig(extensions: string[]): string {
  return ['[req]', 'distinguished_name = dn', '[dn]', '[ext]', ...extensions, ''].join('\n');
}

export async function initCa(dir: string, options: { force?: boolean } = {}): Promise<{ cert: string }> {
  const cert = join(dir, caFiles.cert);
  const key = join(dir, caFiles.key);
  if (!options.force && ((await exists(cert)) || (await exists(key)))) {
    throw new VmferryError('VMF_CONFLICT', `${dir} already holds a CA; every certificate it issued would stop working with a new one (use --force to replace it anyway)`);
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  await rm(key, { force: true });
  await rm(cert, { force: true });
  await writeKey(key);
  const config = join(dir, '.ca.cnf');
  await writeFile(config, opensslConfig(['basicConstraints = critical,CA:TRUE,pathlen:0', 'keyUsage = critical,keyCertSign,cRLSign', 'subjectKeyIdentifier = hash']));
  try {
    await runProgram('openssl', ['req', '-x509', '-new', '-key', key, '-config', config, '-extensions', 'ext', '-subj', '/O=vmferry/OU=ca/CN=vmferry cluster CA', '-days', String(caDays), '-sha256', '-set_serial', serial(), '-out', cert]);
  } finally {
    await rm(config, { force: true });
  }
  return { cert };
}

export interface IssueOptions {
  role: Role;
  id: string;
  /** IPs and DNS names a server is reached at (its certificate's SANs); default 127.0.0.1. Not for operators. */
  addresses?: string[];
  days?: number;
  /** Replace an identity already issued (a rotation: new key, new certificate). */
  force?: boolean;
}

/** The directory an identity's files go to: DIR/agent-A, DIR/operator-alice, DIR/controller when the id is the role. */
export function identityDir(pkiDir: string, role: Role, id: string): string {
  return join(pkiDir, id === role ? role : `${role}-${id}`);
}

export async function issueCertificate(pkiDir: string, options: IssueOptions): Promise<{ dir: string; files: string[] }> {
  const { role, id } = options;
  if (!identityIdPattern.test(id)) throw new VmferryError('VMF_INVALID_ARGUMENT', `an id must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit (got "${id}")`);
  const days = options.days ?? defaultCertificateDays;
  if (!Number.isSafeInteger(days) || days < 1) throw new VmferryError('VMF_INVALID_ARGUMENT', `--days must be a whole number of days, 1 or more (got ${days})`);
  const use = endpoints[role];
  if (!use.server && options.addresses?.length) throw new VmferryError('VMF_INVALID_ARGUMENT', `an ${role} certificate is for a client only: it takes no --address`);
  const san = [`URI:${identityUri({ role, id })}`];
  if (use.server) {
    for (const address of options.addresses?.length ? options.addresses : ['127.0.0.1']) {
      if (isIP(address)) san.push(`IP:${address}`);
      else if (dnsName.test(address)) san.push(`DNS:${address}`);
      else throw new VmferryError('VMF_INVALID_ARGUMENT', `--address must be an IP address or a DNS name (got "${address}")`);
    }
  }
  const caCert = join(pkiDir, caFiles.cert);
  const caKey = join(pkiDir, caFiles.key);
  if (!(await exists(caKey))) throw new VmferryError('VMF_NOT_FOUND', `no CA in ${pkiDir}: run vmferry pki init --dir ${pkiDir} first`);
  const dir = identityDir(pkiDir, role, id);
  if (!options.force && (await exists(dir))) throw new VmferryError('VMF_CONFLICT', `${dir} already exists; to rotate its key and certificate, issue again with --force`);

  // Built aside and moved into place, so a failure leaves no half-written identity.
  const work = await mkdtemp(join(pkiDir, `.issue-${role}-`));
  try {
    const key = join(work, 'key.pem');
    const cert = join(work, 'cert.pem');
    await writeKey(key);
    const config = join(work, 'openssl.cnf');
    const usage = [use.server ? 'serverAuth' : '', use.client ? 'clientAuth' : ''].filter(Boolean).join(',');
    await writeFile(config, opensslConfig([
      'basicConstraints = critical,CA:FALSE',
      'keyUsage = critical,digitalSignature',
      `extendedKeyUsage = ${usage}`,
      `subjectAltName = ${san.join(',')}`,
      'subjectKeyIdentifier = hash',
      'authorityKeyIdentifier = keyid',
    ]));
    const csr = join(work, 'request.pem');
    await runProgram('openssl', ['req', '-new', '-key', key, '-config', config, '-subj', `/O=vmferry/OU=${role}/CN=${id}`, '-out', csr]);
    await runProgram('openssl', ['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-set_serial', serial(), '-days', String(days), '-sha256', '-extfile', config, '-extensions', 'ext', '-out', cert]);
    const files: string[] = [identityFiles.ca];
    await copyFile(caCert, join(work, identityFiles.ca));
    for (const [enabled, certName, keyName] of [[use.server, identityFiles.serverCert, identityFiles.serverKey], [use.client, identityFiles.clientCert, identityFiles.clientKey]] as const) {
      if (!enabled) continue;
      await copyFile(cert, join(work, certName));
      await copyFile(key, join(work, keyName));
      await chmod(join(work, keyName), 0o600);
      files.push(certName, keyName);
    }
    await Promise.all([key, cert, config, csr].map((file) => rm(file)));
    await chmod(work, 0o700);
    if (options.force) await rm(dir, { recursive: true, force: true });
    await rename(work, dir);
    return { dir, files };
  } catch (err) {
    await rm(work, { recursive: true, force: true });
    throw err;
  }
}

/**
 * QEMU's side of the cluster PKI: every QEMU an agent with a TLS identity
 * starts carries two `tls-creds-x509` objects made from that identity, one to
 * serve (the destination's RAM migration listener and mirror NBD export) and
 * one to connect (the source's migration and mirror, every VM's shared disks on
 * the storage server). QEMU reads credentials from a directory with fixed file
 * names, so the agent writes its identity there once at start.
 */
import { X509Certificate } from 'node:crypto';
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';
import type { Role } from '../security/identity.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import { identityFiles } from '../security/pki.ts';
import type { NbdServerAddress } from './spec.ts';

/** Where an agent keeps its identity in QEMU's layout: for its QEMUs, and for anyone opening its VMs' disks as they did. */
export function agentQemuTlsDir(dataDir: string): string {
  return join(dataDir, 'tls');
}

/** The ids of the two objects, for `tls-creds` of migration parameters, nbd-server-start and NBD blockdevs. */
export const qemuTlsCreds = { server: 'vmf-tls-server', client: 'vmf-tls-client' } as const;

/**
 * RFC 7919's ffdhe2048 group, as `openssl genpkey -genparam -algorithm DH
 * -pkeyopt group:ffdhe2048` prints it. Without a dh-params.pem QEMU generates
 * Diffie-Hellman parameters each time a server credential object is made,
 * which added 0.3-0.6 s to every QEMU start here (docs/BENCHMARKS.md).
 */
const ffdhe2048 = `-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
`;

/**
 * Writes the identity in the layout QEMU's `dir=` expects. An agent's
 * certificate is both a server and a client one (pki.ts gives it both extended
 * key usages), so the same pair serves both ends.
 */
export async function writeQemuTlsDir(identity: TlsIdentity, dir: string): Promise<string> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const files: [string, string][] = [
    [identityFiles.ca, identity.ca],
    [identityFiles.serverCert, identity.cert],
    [identityFiles.serverKey, identity.key],
    [identityFiles.clientCert, identity.cert],
    [identityFiles.clientKey, identity.key],
    ['dh-params.pem', ffdhe2048],
  ];
  for (const [name, pem] of files) await writeFile(join(dir, name), pem, { mode: 0o600 });
  return dir;
}

/** One credential object; verify-peer on both ends: a server asks every client for a certificate of the cluster's CA. */
function credsObject(endpoint: keyof typeof qemuTlsCreds, dir: string): string {
  // A comma ends a QEMU option value unless doubled.
  return `tls-creds-x509,id=${qemuTlsCreds[endpoint]},endpoint=${endpoint},dir=${dir.replaceAll(',', ',,')},verify-peer=on`;
}

/** The `-object` arguments of every QEMU an agent with an identity starts. */
export function qemuTlsArguments(dir: string): string[] {
  return ['-object', credsObject('server', dir), '-object', credsObject('client', dir)];
}

/** The client object alone, for qemu-img and qemu-io (`--object`), which connect and never serve. */
export function qemuClientTlsObject(dir: string): string {
  return credsObject('client', dir);
}

/**
 * What an NBD client node of the storage server adds under TLS: our client
 * credentials, and the name the server's certificate must carry (its address,
 * as `vmferry pki issue --address` put it there). Over a unix socket there is
 * no such name to check.
 */
export function nbdClientTlsOptions(server: NbdServerAddress): { 'tls-creds': string; 'tls-hostname': string } {
  if (server.type === 'unix') {
    throw new VmferryError('VMF_INVALID_SPEC', `the storage server at unix socket ${server.path} cannot be reached under TLS: no name to check its certificate against; give its TCP address`);
  }
  return { 'tls-creds': qemuTlsCreds.client, 'tls-hostname': server.host };
}

/**
 * The distinguished name QEMU gives a tls-authz object for a certificate of
 * `vmferry pki issue ROLE ID` (subject O=vmferry, OU=ROLE, CN=ID): GnuTLS's
 * gnutls_x509_crt_get_dn, in the certificate's own order, not RFC 4514's
 * reversed one (test/security/qemu-streams.test.ts holds it to what QEMU 7.2 reports).
 */
export function qemuPeerName(role: Role, id: string): string {
  return `O=vmferry,OU=${role},CN=${id}`;
}

/**
 * Whether a peer's certificate name can be known in advance, judged by this
 * agent's own certificate: `vmferry pki` gives every agent the subject
 * O=vmferry, OU=agent, CN=host id. Certificates of another CA carry subjects
 * vmferry cannot predict; then the cluster's CA alone decides who connects.
 */
export function peerNamesPredictable(identity: TlsIdentity, hostId: string): boolean {
  return new X509Certificate(identity.cert).subject === `O=vmferry\nOU=agent\nCN=${hostId}`;
}

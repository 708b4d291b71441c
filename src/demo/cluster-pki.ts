/**
 * A throwaway cluster PKI for a LocalCluster: a CA of its own under the
 * cluster's work directory, and the identities its daemons and its own calls
 * need. The same `pki` functions as `vmferry pki init/issue`.
 */
import type { Role } from '../security/identity.ts';
import { identityDir, initCa, issueCertificate } from '../security/pki.ts';
import { loadTlsIdentity, type TlsIdentity } from '../security/tls-files.ts';

export class ClusterPki {
  readonly dir: string;
  /** For the in-process controller, and for the cluster's own calls to the storage admin API and the agents. */
  readonly controller: TlsIdentity;
  readonly storage: TlsIdentity;
  /** For the cluster's calls to the controller's API (LocalCluster.api). */
  readonly operator: TlsIdentity;

  private constructor(dir: string, identities: { controller: TlsIdentity; storage: TlsIdentity; operator: TlsIdentity }) {
    this.dir = dir;
    this.controller = identities.controller;
    this.storage = identities.storage;
    this.operator = identities.operator;
  }

  /** `serviceAddress`: where the controller and the storage server listen. */
  static async create(dir: string, serviceAddress: string): Promise<ClusterPki> {
    await initCa(dir, { force: true });
    const issue = async (role: Role, end: 'server' | 'client'): Promise<TlsIdentity> => {
      const { dir: identity } = await issueCertificate(dir, { role, id: role, addresses: end === 'server' ? [serviceAddress] : [], force: true });
      return loadTlsIdentity({ pkiDir: identity }, end) as TlsIdentity;
    };
    return new ClusterPki(dir, { controller: await issue('controller', 'server'), storage: await issue('storage', 'server'), operator: await issue('operator', 'client') });
  }

  /** The identity directory a daemon process is started with (--pki-dir). */
  daemonDir(role: 'controller' | 'storage'): string {
    return identityDir(this.dir, role, role);
  }

  /** Issues host `id`'s agent certificate for the addresses it is reached at; returns its directory. */
  async issueAgent(id: string, addresses: string[]): Promise<string> {
    return (await issueCertificate(this.dir, { role: 'agent', id, addresses, force: true })).dir;
  }
}

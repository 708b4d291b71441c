/**
 * Who a certificate speaks for. Every certificate the cluster PKI issues names
 * one role and one id, in a SAN URI `vmferry:ROLE:ID` (and, for people reading
 * it with openssl, in the subject as OU=ROLE, CN=ID). Servers decide what a
 * caller may do from the URI alone: the subject is free text, a SAN URI is not.
 */
export const roles = ['controller', 'agent', 'storage', 'operator'] as const;
export type Role = (typeof roles)[number];

export interface PeerIdentity {
  role: Role;
  id: string;
}

/** The same rule as a host id (controller's heartbeat schema): safe in a file name, a subject and a URI. */
export const identityIdPattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function isRole(text: string): text is Role {
  return (roles as readonly string[]).includes(text);
}

export function identityUri(identity: PeerIdentity): string {
  return `vmferry:${identity.role}:${identity.id}`;
}

const uriEntry = /^URI:vmferry:([a-z]+):(.+)$/;

/**
 * The identity in a certificate's subjectAltName, as Node prints it
 * ("URI:vmferry:agent:A, IP Address:127.0.0.1"); undefined unless it names
 * exactly one well-formed vmferry identity.
 */
export function identityFromSubjectAltName(subjectAltName: string | undefined): PeerIdentity | undefined {
  const found: PeerIdentity[] = [];
  for (const entry of (subjectAltName ?? '').split(', ')) {
    const match = uriEntry.exec(entry);
    if (!match) continue;
    const [, role, id] = match as unknown as [string, string, string];
    if (!isRole(role) || !identityIdPattern.test(id)) return undefined;
    found.push({ role, id });
  }
  return found.length === 1 ? found[0] : undefined;
}

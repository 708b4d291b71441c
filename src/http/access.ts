/**
 * Who may call which route. With TLS, the handshake already refused anyone
 * without a certificate of the cluster's CA; here each request is checked
 * against the roles its server allows on that route, from the identity in the
 * caller's certificate (security/identity.ts). A route nobody listed is
 * refused: a new route is closed until its server's policy opens it.
 * GET /healthz and GET /metrics are open to every role of the cluster on every
 * server: a monitor holds whichever certificate it was given, and learns
 * nothing there it could act on. Without a certificate of the cluster it
 * still gets nothing.
 */
import type { TLSSocket } from 'node:tls';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { VmferryError } from '../errors.ts';
import { identityFromSubjectAltName, identityUri, roles, type PeerIdentity, type Role } from '../security/identity.ts';

/** The roles allowed on a route (its pattern, such as /v1/vms/:name; undefined for a path no route matches). */
export type AccessPolicy = (method: string, route: string | undefined) => readonly Role[];

const monitoringRoutes: readonly string[] = ['/healthz', '/metrics'];

/** The roles allowed on a route: every role on the monitoring routes, else what the server's own policy says. */
function allowedRoles(policy: AccessPolicy, method: string, route: string | undefined): readonly Role[] {
  if ((method === 'GET' || method === 'HEAD') && route !== undefined && monitoringRoutes.includes(route)) return roles;
  return policy(method, route);
}

const identities = new WeakMap<TLSSocket, PeerIdentity | null>();

/** The identity in the caller's certificate; undefined on a plain HTTP server. */
export function peerIdentity(request: FastifyRequest): PeerIdentity | undefined {
  const socket = request.raw.socket as Partial<TLSSocket>;
  if (typeof socket.getPeerCertificate !== 'function') return undefined;
  const tlsSocket = socket as TLSSocket;
  let identity = identities.get(tlsSocket);
  if (identity === undefined) {
    identity = identityFromSubjectAltName(tlsSocket.getPeerCertificate().subjectaltname) ?? null;
    identities.set(tlsSocket, identity);
  }
  if (identity === null) throw new VmferryError('VMF_FORBIDDEN', 'the client certificate names no vmferry identity (a SAN URI vmferry:ROLE:ID, as vmferry pki issue writes)');
  return identity;
}

/** Refuses a request whose caller is not the host it speaks for (an agent heartbeating as another host). */
export function requireSameId(request: FastifyRequest, id: string): void {
  const peer = peerIdentity(request);
  if (peer && peer.id !== id) throw new VmferryError('VMF_FORBIDDEN', `${identityUri(peer)} may not act for "${id}"`);
}

export function installAccessControl(app: FastifyInstance, policy: AccessPolicy): void {
  app.addHook('onRequest', (request, _reply, done) => {
    try {
      const peer = peerIdentity(request);
      const allowed = allowedRoles(policy, request.method, request.routeOptions.url);
      if (peer && !allowed.includes(peer.role)) {
        throw new VmferryError('VMF_FORBIDDEN', `${identityUri(peer)} may not call ${request.method} ${request.routeOptions.url ?? request.url} (allowed: ${allowed.join(', ') || 'nobody'})`);
      }
      done();
    } catch (err) {
      done(err as Error);
    }
  });
}

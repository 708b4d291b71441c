/**
 * A standby's API: it answers reads from the shared database, and refuses
 * every request that would act (start or cancel a migration, create, start,
 * stop or delete a VM) with VMF_NOT_LEADER, naming the leader in the message
 * and in the vmferry-leader header, so a client can send it there. Agents'
 * heartbeats are taken by any controller: they only record that a host is alive.
 */
import type { FastifyInstance } from 'fastify';
import { leaderUrlHeader, type Leadership } from './leadership.ts';

const readMethods = new Set(['GET', 'HEAD', 'OPTIONS']);

export function installStandbyGuard(app: FastifyInstance, leadership: Leadership): void {
  app.addHook('preHandler', async (request, reply) => {
    if (readMethods.has(request.method) || request.routeOptions.url === '/v1/hosts/heartbeat') return;
    const status = leadership.status();
    if (status.leader) return;
    if (status.leaderUrl && status.leaderUrl !== status.self) void reply.header(leaderUrlHeader, status.leaderUrl);
    leadership.requireLeader();
  });
  // Where clients and the CLI find the leader (src/controller/failover.ts).
  app.get('/v1/leader', { schema: { description: 'which controller leads, and this one\'s role' } }, () => leadership.status());
}

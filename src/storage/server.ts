/**
 * vmferry's storage server: shared volumes exported over NBD (TCP and/or a
 * unix socket), and an admin HTTP API to manage them.
 */
import { createApiServer } from '../http/api-server.ts';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import type { PeerCertificate } from 'node:tls';
import type { Logger } from 'pino';
import { NbdServer, defaultLimits } from '../nbd/server.ts';
import { VolumeService, maxVolumeBytes, type VolumeServiceOptions } from './volumes.ts';
import { VolumeStatsSchema } from './traffic.ts';
import { renderStorageMetrics } from './metrics.ts';
import { metricsContentType } from '../http/prometheus.ts';
import { parseExportName } from './writer-leases.ts';
import { namePatternSource, nameRule } from '../util/names.ts';
import type { AccessPolicy } from '../http/access.ts';
import { identityFromSubjectAltName, identityUri, type Role } from '../security/identity.ts';
import type { TlsIdentity } from '../security/tls-files.ts';

export interface StorageServerOptions {
  dataDir: string;
  logger: Logger;
  /** NBD over TCP; port 0 picks a free one. */
  nbd?: { host: string; port: number };
  /** NBD over a unix socket. */
  socket?: string;
  /** Admin HTTP API; port 0 picks a free one. */
  admin?: { host: string; port: number };
  /** Memory all NBD connections together may hold for requests and unsent replies (default 256 MiB). */
  memoryBudgetBytes?: number;
  /** Test hooks and tuning of the volumes (volumes.ts). */
  volumes?: VolumeServiceOptions;
  /** Mutual TLS on the admin API and on NBD (every listener): a client without a certificate of the CA is refused. */
  tls?: TlsIdentity;
}

/** The controller and the agents (writer leases) manage volumes; operators do not (docs/SECURITY.md). */
export const storageAccess: AccessPolicy = () => ['controller', 'agent'];

/** Who may open volumes over NBD: the agents (their QEMUs and probes) and the controller, as on the admin API. */
const nbdClientRoles: readonly Role[] = ['controller', 'agent'];

/** The NBD server's check of a client certificate the cluster CA issued: its role, from its SAN URI. */
export function admitNbdClient(certificate: PeerCertificate): { peer: string; refusal?: string } {
  const identity = identityFromSubjectAltName(certificate.subjectaltname);
  if (!identity) {
    const subject = Object.entries(certificate.subject ?? {}).map(([key, value]) => `${key}=${String(value)}`).join(',');
    return { peer: `subject "${subject}"`, refusal: 'the client certificate names no vmferry identity (a SAN URI vmferry:ROLE:ID)' };
  }
  const peer = identityUri(identity);
  if (!nbdClientRoles.includes(identity.role)) return { peer, refusal: `${peer} may not open volumes (allowed: ${nbdClientRoles.join(', ')})` };
  return { peer };
}

const VolumeName = Type.String({ pattern: namePatternSource, description: nameRule });
const SizeBytes = Type.Integer({ minimum: 512, maximum: maxVolumeBytes, multipleOf: 512 });

async function adminApi(volumes: VolumeService, nbd: NbdServer, logger: Logger, tls: TlsIdentity | undefined): Promise<FastifyInstance> {
  const { base, app } = await createApiServer('vmferry storage', logger, 64 * 1024, { tls, access: storageAccess }, {
    role: 'storage',
    facts: () => Promise.resolve({ volumes: volumes.volumes().length, nbdConnections: nbd.connections().length }),
  });
  const nameParams = Type.Object({ name: VolumeName });
  app.get('/v1/volumes', () => volumes.volumes());
  app.post(
    '/v1/volumes',
    { schema: { body: Type.Object({ name: VolumeName, sizeBytes: SizeBytes, readOnly: Type.Optional(Type.Boolean()) }, { additionalProperties: false }) } },
    async (request, reply) => reply.status(201).send(await volumes.create(request.body.name, request.body.sizeBytes, request.body.readOnly ?? false)),
  );
  app.get('/v1/volumes/:name', { schema: { params: nameParams } }, (request) => volumes.get(request.params.name));
  // What the volume's NBD clients read and wrote: a migration's report asks before and after (src/controller/storage-io.ts).
  app.get('/v1/volumes/:name/stats', { schema: { params: nameParams, response: { 200: VolumeStatsSchema } } }, (request) => volumes.stats(request.params.name));
  app.patch(
    '/v1/volumes/:name',
    { schema: { params: nameParams, body: Type.Object({ sizeBytes: SizeBytes }, { additionalProperties: false }) } },
    (request) => volumes.resize(request.params.name, request.body.sizeBytes),
  );
  app.delete(
    '/v1/volumes/:name',
    {
      schema: {
        params: nameParams,
        querystring: Type.Object(
          { force: Type.Optional(Type.Boolean({ description: 'delete even while clients are attached, a writer holds its lease, or a client may be reconnecting' })) },
          { additionalProperties: false },
        ),
      },
    },
    async (request, reply) => {
      await volumes.remove(request.params.name, { force: request.query.force ?? false });
      return reply.status(204).send();
    },
  );
  // The one-writer fence (writer-leases.ts): the migration's switch-over moves a shared volume's lease to the destination.
  const holderBody = Type.Object(
    { holder: Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$', description: 'the writer token the writer put after @ in its export name' }) },
    { additionalProperties: false },
  );
  app.put('/v1/volumes/:name/writer', { schema: { params: nameParams, body: holderBody } }, (request) =>
    volumes.grantWriter(request.params.name, request.body.holder),
  );
  app.post('/v1/volumes/:name/writer/release', { schema: { params: nameParams, body: holderBody } }, (request) =>
    volumes.releaseWriter(request.params.name, request.body.holder),
  );
  // Volume files the server found without a catalog entry at start (quarantine.ts).
  app.get('/v1/quarantine', () => volumes.listQuarantine());
  app.post('/v1/quarantine/:name/restore', { schema: { params: nameParams } }, async (request, reply) => reply.status(201).send(await volumes.restore(request.params.name)));
  app.delete('/v1/quarantine/:name', { schema: { params: nameParams } }, async (request, reply) => {
    await volumes.purge(request.params.name);
    return reply.status(204).send();
  });
  // Export names carry writer tokens, which no listing shows.
  app.get('/metrics', { schema: { description: 'Prometheus text exposition: NBD requests, their time and bytes per volume, connections, writer leases' } }, (_request, reply) =>
    reply.type(metricsContentType).send(renderStorageMetrics(volumes.metrics(), nbd.connections().length)),
  );
  app.get('/v1/connections', () => nbd.connections().map((c) => ({ ...c, export: c.export === undefined ? undefined : parseExportName(c.export).volume })));
  return base;
}
export class StorageServer {
  readonly volumes: VolumeService;
  readonly nbd: NbdServer;
  readonly admin: FastifyInstance;
  /** Where it listens, with ports resolved. */
  readonly addresses: { nbdPort?: number; socket?: string; adminUrl?: string } = {};

  private constructor(volumes: VolumeService, nbd: NbdServer, admin: FastifyInstance) {
    this.volumes = volumes;
    this.nbd = nbd;
    this.admin = admin;
  }

  static async start(options: StorageServerOptions): Promise<StorageServer> {
    const volumes = await VolumeService.open(options.dataDir, options.logger, options.volumes);
    const limits = { ...defaultLimits, memoryBudgetBytes: options.memoryBudgetBytes ?? defaultLimits.memoryBudgetBytes };
    const nbd = new NbdServer(volumes, options.logger.child({ component: 'nbd' }), limits, options.tls ? { ...options.tls, admit: admitNbdClient } : undefined);
    const server = new StorageServer(volumes, nbd, await adminApi(volumes, nbd, options.logger.child({ component: 'admin' }), options.tls));
    try {
      if (options.nbd) server.addresses.nbdPort = await nbd.listenTcp(options.nbd.host, options.nbd.port);
      if (options.socket) {
        await nbd.listenUnix(options.socket);
        server.addresses.socket = options.socket;
      }
      if (options.admin) server.addresses.adminUrl = await server.admin.listen({ host: options.admin.host, port: options.admin.port });
    } catch (err) {
      await server.close();
      throw err;
    }
    return server;
  }

  /** Drains NBD clients (their in-flight writes complete), then syncs and closes every volume. */
  async close(): Promise<void> {
    await this.admin.close();
    this.volumes.stopping();
    await this.nbd.close();
    await this.volumes.close();
  }
}

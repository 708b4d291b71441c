/**
 * The controller's HTTP API, for the CLI and the dashboard: hosts, VMs (through
 * their agents), and migrations with their events, live streams and reports;
 * and the dashboard's page (dashboard.ts).
 */
import { createApiServer } from '../http/api-server.ts';
import { VmferryError } from '../errors.ts';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { CreateVmRequestSchema, hostAddressPattern, MigrationParamsSchema, QuarantineParamsSchema, VmNameParamsSchema } from '../api/agent-types.ts';
import { MigrateRequestSchema, ResolveRequestSchema } from '../api/controller-types.ts';
import { openStore } from '../store/open-store.ts';
import type { Store } from '../store/store.ts';
import { Inventory } from './inventory.ts';
import { registerDashboard } from './dashboard.ts';
import { announcingStore, MigrationChanges } from './events.ts';
import { registerEventStreams } from './event-stream.ts';
import { renderMetrics } from './metrics.ts';
import { metricsContentType } from '../http/prometheus.ts';
import { MigrationService } from './migrations.ts';
import { registerDrainRoutes } from './drain-routes.ts';
import { DrainService } from './drain.ts';
import { sharedLeadership, soleLeadership, type Leadership } from './leadership.ts';
import { installStandbyGuard } from './standby-guard.ts';
import { runTenures } from './tenure.ts';
import { isPostgresUrl } from '../store/postgres-store.ts';
import type { StorageServerAccess } from './storage-io.ts';
import { requireSameId, type AccessPolicy } from '../http/access.ts';
import type { TlsIdentity } from '../security/tls-files.ts';

export interface ControllerOptions {
  /** A SQLite file, or a postgres:// URL (src/store/open-store.ts). */
  dbPath: string;
  logger: Logger;
  store?: Store;
  /** Serve with mutual TLS, and present this identity to the agents. */
  tls?: TlsIdentity;
  /** The storage server's admin API: a migration's report says what it saw of each re-attached disk (storage-io.ts). */
  storage?: StorageServerAccess;
  /** This controller's URL, its name in the leader lease: needed with a postgres:// database, where several controllers may share it. */
  url?: string;
  /** How long a leader's lease renewal holds (default 5 s): a standby takes over within about this long of the leader's death. */
  leaseTtlMs?: number;
}

export const defaultLeaseTtlMs = 5_000;

/** Several controllers may share a PostgreSQL database, and then one leads at a time; a SQLite file has one controller. */
async function startLeadership(options: ControllerOptions): Promise<Leadership> {
  if (!isPostgresUrl(options.dbPath)) return soleLeadership();
  if (!options.url) throw new VmferryError('VMF_INVALID_ARGUMENT', 'a controller on a PostgreSQL database needs its own URL, which the other controllers name as leader (--advertise-url)');
  return sharedLeadership(options.dbPath, { url: options.url, ttlMs: options.leaseTtlMs ?? defaultLeaseTtlMs, logger: options.logger });
}

/** Agents only heartbeat (as themselves: see the route); operators use everything else (docs/SECURITY.md). */
export const controllerAccess: AccessPolicy = (method, route) => (method === 'POST' && route === '/v1/hosts/heartbeat' ? ['agent'] : ['operator']);

export async function buildController(
  options: ControllerOptions,
): Promise<{ app: FastifyInstance; migrations: MigrationService; store: Store }> {
  // Every write to a migration wakes the live streams (events.ts, event-stream.ts).
  const changes = new MigrationChanges();
  // A leader stalled inside a write is cut off by PostgreSQL within half a lease, so a standby's takeover never waits on it.
  const leaseTtlMs = options.leaseTtlMs ?? defaultLeaseTtlMs;
  const store = announcingStore(options.store ?? (await openStore(options.dbPath, options.logger, { idleInTransactionTimeoutMs: leaseTtlMs / 2 })), changes);
  const leadership = await startLeadership(options).catch(async (err: unknown) => {
    await store.close();
    throw err;
  });
  // Reads, heartbeats and the acting routes a standby refuses anyway; what a leader does goes through its tenure (tenure.ts).
  const inventory = new Inventory(store, options.tls, leadership);
  const migrations = new MigrationService(store, options.logger, options.storage);
  const drains = new DrainService(store, inventory, migrations, options.logger, changes);
  const { base, app } = await createApiServer('vmferry controller', options.logger, 1024 * 1024, { tls: options.tls, access: controllerAccess }, {
    role: 'controller',
    // Both read the store: an unreachable database makes the controller unhealthy, with the driver's reason.
    facts: async () => {
      const hosts = await inventory.hosts();
      return { store: 'ok', leader: leadership.status().leader, hosts: hosts.length, hostsReachable: hosts.filter((h) => h.state === 'reachable').length, migrationsRunning: (await store.unfinishedMigrations()).length };
    },
  });
  // Migrations a previous controller process or leader left behind: settled in the background while the API serves.
  const tenures = runTenures({ leadership, store, tls: options.tls, migrations, logger: options.logger });
  installStandbyGuard(base, leadership);
  app.addHook('onClose', async () => {
    await drains.close();
    await migrations.drain();
    // A leader gives the lease up: a standby takes over now rather than when it expires.
    await leadership.stop();
    await tenures.stopped();
    await store.close();
  });

  // Every migration record is read at each scrape (metrics.ts): the store is the one place all controllers' figures are.
  app.get('/metrics', { schema: { description: 'Prometheus text exposition; any role of the cluster may scrape it' } }, async (_request, reply) =>
    reply.type(metricsContentType).send(renderMetrics(await store.listMigrations(Number.MAX_SAFE_INTEGER), await inventory.hosts())),
  );
  app.post(
    '/v1/hosts/heartbeat',
    {
      schema: {
        body: Type.Object(
          {
            id: Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' }),
            url: Type.String({ pattern: '^https?://', maxLength: 2048 }),
            address: Type.String({ pattern: hostAddressPattern, maxLength: 255 }),
            // Optional: an agent of the previous version still registers.
            accelerator: Type.Optional(Type.Union([Type.Literal('kvm'), Type.Literal('tcg')])),
            acceleratorReason: Type.Optional(Type.String({ minLength: 1, maxLength: 1000 })),
          },
          { additionalProperties: false },
        ),
      },
    },
    async (request) => {
      // An agent's certificate names its host: it cannot re-point another host to itself.
      requireSameId(request, request.body.id);
      await inventory.heartbeat(request.body);
      return {};
    },
  );
  app.get('/v1/hosts', () => inventory.hosts());
  // A host's quarantine (files its agent could not account for at start), through its agent.
  const hostParams = Type.Object({ host: Type.String({ minLength: 1, maxLength: 64 }) });
  const entryParams = Type.Composite([hostParams, QuarantineParamsSchema]);
  app.get('/v1/hosts/:host/quarantine', { schema: { params: hostParams } }, async (request) => (await inventory.agent(request.params.host)).quarantine());
  app.post('/v1/hosts/:host/quarantine/:id/restore', { schema: { params: entryParams } }, async (request) =>
    (await inventory.agent(request.params.host)).restoreQuarantined(request.params.id),
  );
  app.delete('/v1/hosts/:host/quarantine/:id', { schema: { params: entryParams } }, async (request, reply) => {
    await (await inventory.agent(request.params.host)).purgeQuarantined(request.params.id);
    return reply.status(204).send();
  });

  const nameParams = { params: VmNameParamsSchema };
  app.get('/v1/vms', () => inventory.vms());
  app.post(
    '/v1/vms',
    { schema: { body: Type.Object({ host: Type.String({ minLength: 1, maxLength: 64 }), vm: CreateVmRequestSchema }, { additionalProperties: false }) } },
    async (request, reply) => reply.status(201).send(await inventory.createVm(request.body.host, request.body.vm)),
  );
  app.get('/v1/vms/:name', { schema: nameParams }, (request) => inventory.vm(request.params.name));
  app.post('/v1/vms/:name/start', { schema: nameParams }, async (request) =>
    (await inventory.agent(await inventory.locateVm(request.params.name))).startVm(request.params.name),
  );
  app.post('/v1/vms/:name/stop', { schema: { ...nameParams, querystring: Type.Object({ force: Type.Optional(Type.Boolean()) }, { additionalProperties: false }) } }, async (request) =>
    (await inventory.agent(await inventory.locateVm(request.params.name))).stopVm(request.params.name, request.query.force ?? false),
  );
  app.delete('/v1/vms/:name', { schema: nameParams }, async (request, reply) => {
    await inventory.deleteVm(request.params.name);
    return reply.status(204).send();
  });

  app.post('/v1/migrations', { schema: { body: MigrateRequestSchema } }, async (request, reply) => {
    const { vm, to, dryRun, ...rest } = request.body;
    const options = Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined));
    const result = await migrations.start({ vm, to, dryRun: dryRun ?? false, options });
    return reply.status(result.id ? 202 : 200).send(result);
  });
  app.get('/v1/migrations', () => migrations.list());
  app.get('/v1/migrations/:id', { schema: { params: MigrationParamsSchema } }, (request) => migrations.get(request.params.id));
  app.get(
    '/v1/migrations/:id/events',
    { schema: { params: MigrationParamsSchema, querystring: Type.Object({ after: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER })) }, { additionalProperties: false }) } },
    async (request) => {
      const after = request.query.after ?? 0;
      // ajv coerces "1e400" to Infinity and lets it through every integer check.
      if (!Number.isSafeInteger(after)) throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid request: querystring/after must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}`);
      const record = await migrations.get(request.params.id);
      return { phase: record.phase, events: await store.eventsSince(request.params.id, after), report: record.report };
    },
  );
  registerEventStreams(base, store, changes, drains, options.logger);
  registerDashboard(base, inventory);
  app.post('/v1/migrations/:id/resolve', { schema: { params: MigrationParamsSchema, body: ResolveRequestSchema } }, (request) => migrations.resolve(request.params.id, request.body.runOn));
  app.post('/v1/migrations/:id/cancel', { schema: { params: MigrationParamsSchema } }, (request) => migrations.cancel(request.params.id));
  registerDrainRoutes(app, drains);
  return { app: base, migrations, store };
}

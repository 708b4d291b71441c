/**
 * The agent's HTTP API: VMs on this host, its pool, and both halves of the
 * migrations it takes part in. Routes validate with typebox and hand typed
 * requests to the VmRegistry and MigrationSides services.
 */
import { VmferryError } from '../errors.ts';
import { createApiServer } from '../http/api-server.ts';
import { metricsContentType } from '../http/prometheus.ts';
import { renderAgentMetrics } from './metrics.ts';
import { statfs } from 'node:fs/promises';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { CreateVmRequestSchema, MigrationParamsSchema, MigrationPlanSchema, MirrorTargetSchema, QuarantineParamsSchema, StreamTlsSchema, VmNameParamsSchema, type HostInfo } from '../api/agent-types.ts';
import { replySignal } from '../http/request-signal.ts';
import type { HostAccelerator } from '../qemu/accel.ts';
import { qemuVersion } from '../migration/probe.ts';
import { validateVmSpec } from '../qemu/spec.ts';
import { MigrationSides, defaultAbandonAfterMs } from './migration-sides.ts';
import { faultPoint } from '../util/fault-points.ts';
import { VmRegistry } from './vm-registry.ts';
import { startIoErrorResume } from './io-error-resume.ts';
import { SharedWriterFence } from '../storage/writer-fence.ts';
import { readFile } from 'node:fs/promises';
import { timeoutSignal } from '../util/abort.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import { agentQemuTlsDir, peerNamesPredictable, qemuPeerName, writeQemuTlsDir } from '../qemu/tls-creds.ts';
import { join } from 'node:path';
import type { AccessPolicy } from '../http/access.ts';
import type { NbdServerAddress } from '../qemu/spec.ts';
import { RequestGuard } from './request-guard.ts';
import { installEpochFence, LeaderEpochFence } from './leader-epoch.ts';

export interface AgentOptions {
  hostId: string;
  dataDir: string;
  /** The address other hosts use to reach this one (migration stream, NBD exports). */
  address: string;
  /** The storage server's admin API: with it, shared volumes are fenced to one writer (see storage/writer-fence.ts). */
  storageUrl?: string;
  /** A migration half no controller has touched for this long is settled by the agent where that is safe (default 60 s; 0: never). */
  abandonAfterMs?: number;
  /** What runs this host's guests (chooseAccelerator in src/qemu/accel.ts); default TCG, unprobed, for agents built inside tests. */
  accelerator?: HostAccelerator;
  /**
   * Directories whose files requests may name: kernels, initrds, images to
   * import (--trusted-dir). None: every request that names a host file is refused.
   */
  trustedDirs?: readonly string[];
  /** The storage server's NBD address (--storage-nbd): the only server shared disks may be on. None: shared disks are refused. */
  storageNbd?: NbdServerAddress;
  logger: Logger;
  /** Serve with mutual TLS, and present this identity to the storage server and the controller. */
  tls?: TlsIdentity;
}

/** Only the controller drives an agent: every route of its API (docs/SECURITY.md). */
export const agentAccess: AccessPolicy = () => ['controller'];

/** A misspelt field is an error, not silently ignored (see strictValidation in src/http/errors.ts). */
const strict = { additionalProperties: false };
/** QEMU refuses a downtime-limit above 2000 s; a larger number would fail only deep in the migration. */
const maxDowntimeLimitMs = 2_000_000;
/** The longest a mirror progress query may wait for a mirror event. */
const maxMirrorWaitMs = 10_000;
/**
 * The longest one wait for a migration milestone lasts. Bounded, so a
 * controller that vanished without closing its connection stops counting as
 * contact within this long (migration-sides.ts settles abandoned halves).
 */
const maxMilestoneWaitMs = 10_000;

const MirrorsBody = Type.Object({
  targets: Type.Array(MirrorTargetSchema, { maxItems: 16 }),
  copyMode: Type.Union([Type.Literal('background'), Type.Literal('write-blocking')]),
  bandwidthBytes: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER })),
}, strict);
const MigrateBody = Type.Object({
  uri: Type.String({ pattern: '^tcp:', maxLength: 300 }),
  settings: Type.Object({
    maxBandwidthBytes: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER })),
    // 0: a TCG guest runs through the first pass only (plan.ram.stopAfterFirstPass).
    downtimeLimitMs: Type.Integer({ minimum: 0, maximum: maxDowntimeLimitMs }),
    allowPostcopy: Type.Boolean(),
    tls: StreamTlsSchema,
  }, strict),
}, strict);

async function availableMemoryMiB(): Promise<number> {
  const meminfo = await readFile('/proc/meminfo', 'utf8');
  return Math.floor(Number(/^MemAvailable:\s+(\d+) kB/m.exec(meminfo)?.[1] ?? 0) / 1024);
}

export async function buildAgent(options: AgentOptions): Promise<{ app: FastifyInstance; registry: VmRegistry }> {
  const fence = options.storageUrl ? new SharedWriterFence(options.storageUrl, options.hostId, options.tls) : undefined;
  if (!fence) options.logger.warn('no storage admin URL: shared volumes are not fenced, a stale QEMU could still write to them');
  const accelerator = options.accelerator ?? { accelerator: 'tcg', reason: 'not probed: the embedding program chose no accelerator' };
  // Rewritten at every start: a rotated certificate reaches the next QEMU this agent starts.
  const qemuTlsDir = options.tls ? await writeQemuTlsDir(options.tls, agentQemuTlsDir(options.dataDir)) : undefined;
  const guard = await RequestGuard.create({ trustedDirs: options.trustedDirs ?? [], poolDir: join(options.dataDir, 'pool'), vmsDir: join(options.dataDir, 'vms'), storageNbd: options.storageNbd });
  if (!options.trustedDirs?.length) options.logger.warn('no --trusted-dir: requests that name a kernel, an initrd or an image to import are refused');
  const registry = new VmRegistry(options.hostId, options.dataDir, options.logger, accelerator, guard, fence, qemuTlsDir);
  await registry.init();
  const sides = new MigrationSides(registry, options.address, options.logger, {
    abandonAfterMs: options.abandonAfterMs ?? defaultAbandonAfterMs,
    ...(options.tls && peerNamesPredictable(options.tls, options.hostId) ? { agentPeerName: (id: string) => qemuPeerName('agent', id) } : {}),
  });
  await sides.recoverSources();
  // Asked once, at the first health check; a failure (no QEMU binary) is asked again at the next.
  let knownQemuVersion: Promise<string> | undefined;
  const hostQemuVersion = (): Promise<string> =>
    (knownQemuVersion ??= qemuVersion().catch((err: unknown) => {
      knownQemuVersion = undefined;
      throw err;
    }));
  const { base, app } = await createApiServer('vmferry agent', options.logger, 1024 * 1024, { tls: options.tls, access: agentAccess }, {
    role: 'agent',
    facts: async () => ({ hostId: options.hostId, accelerator: accelerator.accelerator, qemuVersion: await hostQemuVersion(), vms: registry.names().length }),
  });
  installEpochFence(base, await LeaderEpochFence.load(options.dataDir, options.logger));
  const stopIoErrorResume = startIoErrorResume({ candidates: () => registry.vmsOutsideMigrations(), logger: options.logger });
  base.addHook('onClose', () => {
    stopIoErrorResume();
    sides.close();
  });

  app.get('/v1/host', async (): Promise<HostInfo> => {
    const fs = await statfs(registry.pool.dir);
    return {
      hostId: options.hostId,
      address: options.address,
      qemuVersion: (await sides.capabilities()).version,
      accelerator: accelerator.accelerator,
      acceleratorReason: accelerator.reason,
      freeMemoryMiB: await availableMemoryMiB(),
      poolFreeBytes: fs.bavail * fs.bsize,
      vms: registry.names().length,
    };
  });

  app.get('/metrics', { schema: { description: 'Prometheus text exposition: VMs by state, migrating, block jobs, pool free space' } }, async (_request, reply) => {
    const fs = await statfs(registry.pool.dir);
    return reply.type(metricsContentType).send(renderAgentMetrics({ hostId: options.hostId, accelerator: accelerator.accelerator, vms: await registry.list(), poolFreeBytes: fs.bavail * fs.bsize }));
  });

  app.get('/v1/vms', () => registry.list());
  app.post('/v1/vms', { schema: { body: CreateVmRequestSchema } }, async (request, reply) => {
    const info = await registry.create(request.body);
    return reply.status(201).send(info);
  });
  app.get('/v1/vms/:name', { schema: { params: VmNameParamsSchema } }, (request) => registry.info(request.params.name));
  app.post('/v1/vms/:name/start', { schema: { params: VmNameParamsSchema } }, (request) => registry.start(request.params.name));
  app.post(
    '/v1/vms/:name/stop',
    { schema: { params: VmNameParamsSchema, querystring: Type.Object({ force: Type.Optional(Type.Boolean()) }, strict) } },
    (request) => registry.stop(request.params.name, request.query.force ?? false),
  );
  app.delete('/v1/vms/:name', { schema: { params: VmNameParamsSchema } }, async (request, reply) => {
    await registry.remove(request.params.name);
    return reply.status(204).send();
  });
  app.post('/v1/vms/:name/probe-source', { schema: { params: VmNameParamsSchema } }, (request) => sides.probeSource(request.params.name));
  app.post('/v1/vms/:name/measure-ram', { schema: { params: VmNameParamsSchema } }, (request) => sides.measureGuestRam(request.params.name));
  app.post('/v1/probe-destination', { schema: { body: Type.Object({ spec: Type.Unknown() }, strict) } }, (request) =>
    sides.probeDestination(validateVmSpec(request.body.spec)),
  );

  // What start-up could not account for (src/agent/quarantine.ts): listed, restored, or purged by a person.
  app.get('/v1/quarantine', () => registry.quarantine.list());
  app.post('/v1/quarantine/:id/restore', { schema: { params: QuarantineParamsSchema } }, (request) => registry.restoreQuarantined(request.params.id));
  app.delete('/v1/quarantine/:id', { schema: { params: QuarantineParamsSchema } }, async (request, reply) => {
    await registry.quarantine.purge(request.params.id);
    return reply.status(204).send();
  });

  // Destination half of a migration.
  const params = MigrationParamsSchema;
  app.get('/v1/migrations/:id', { schema: { params } }, (request) => sides.describe(request.params.id));
  app.post('/v1/migrations/:id/destination/prepare', { schema: { params, body: Type.Object({ spec: Type.Unknown(), plan: MigrationPlanSchema }, strict) } }, (request, reply) =>
    sides.prepareDestination(request.params.id, validateVmSpec(request.body.spec), request.body.plan, replySignal(reply)),
  );
  app.post('/v1/migrations/:id/destination/wait-incoming', { schema: { params } }, async (request, reply) => {
    await sides.useDestination(request.params.id, (side) => side.waitIncomingCompleted(replySignal(reply)));
    return {};
  });
  app.post('/v1/migrations/:id/destination/wait-runnable', { schema: { params } }, async (request, reply) => ({
    runnable: await sides.useDestination(request.params.id, (side) => side.waitIncomingRunnable(replySignal(reply))),
  }));
  app.post('/v1/migrations/:id/destination/postcopy-recover', { schema: { params } }, async (request, reply) => ({
    uri: await sides.recoverDestinationPostcopy(request.params.id, replySignal(reply)),
  }));
  app.post('/v1/migrations/:id/destination/postcopy-resets', { schema: { params } }, async (request) => ({
    resets: await sides.destinationPostcopyResets(request.params.id),
  }));
  app.post('/v1/migrations/:id/destination/memory-digest', { schema: { params } }, (request, reply) =>
    sides.useDestination(request.params.id, (side) => side.memoryDigest(replySignal(reply))),
  );
  app.post('/v1/migrations/:id/destination/resume', { schema: { params } }, async (request) => {
    // Not cancelled when the caller goes away: a resume stopped half-way (lease taken, cont sent) is the one state nobody can settle.
    return sides.resumeDestination(request.params.id, timeoutSignal(`the resume of migration ${request.params.id}`, 60_000));
  });
  app.post('/v1/migrations/:id/destination/fate', { schema: { params } }, async (request) => ({ fate: await sides.destinationFate(request.params.id) }));
  // An operator's choice for a migration whose destination cannot tell whether the guest ran here (controller/resolve.ts).
  app.post('/v1/migrations/:id/destination/take-back', { schema: { params } }, (request) => sides.takeBackDestination(request.params.id));
  app.post('/v1/migrations/:id/destination/rollback', { schema: { params } }, async (request) => {
    await sides.rollbackDestination(request.params.id);
    return {};
  });

  // Source half of a migration.
  app.post('/v1/migrations/:id/source/begin', { schema: { params, body: Type.Object({ plan: MigrationPlanSchema }, strict) } }, async (request) => {
    await sides.beginSource(request.params.id, request.body.plan);
    return {};
  });
  app.post('/v1/migrations/:id/source/mirrors', { schema: { params, body: MirrorsBody } }, async (request, reply) => {
    const { targets, copyMode, bandwidthBytes } = request.body;
    await sides.startMirrors(request.params.id, targets, copyMode, bandwidthBytes, replySignal(reply));
    return {};
  });
  app.get(
    '/v1/migrations/:id/source/mirrors',
    { schema: { params, querystring: Type.Object({ waitMs: Type.Optional(Type.Integer({ minimum: 0, maximum: maxMirrorWaitMs })) }, strict) } },
    (request, reply) => {
      const waitMs = request.query.waitMs ?? 0;
      // ajv coerces "1e400" to Infinity and lets it through every integer check.
      if (!Number.isSafeInteger(waitMs)) throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid request: querystring/waitMs must be an integer from 0 to ${maxMirrorWaitMs}`);
      return sides.useSource(request.params.id, (side) => side.mirrorStatus(replySignal(reply), waitMs));
    },
  );
  app.post('/v1/migrations/:id/source/migrate', { schema: { params, body: MigrateBody } }, async (request, reply) => {
    await sides.startMigration(request.params.id, request.body.uri, request.body.settings, replySignal(reply));
    return {};
  });
  app.get('/v1/migrations/:id/source/info', { schema: { params } }, (request, reply) => sides.useSource(request.params.id, (side) => side.migrationInfo(replySignal(reply))));
  app.post(
    '/v1/migrations/:id/source/wait-milestone',
    { schema: { params, querystring: Type.Object({ waitMs: Type.Optional(Type.Integer({ minimum: 1, maximum: maxMilestoneWaitMs })) }, strict) } },
    async (request, reply) => {
      const waitMs = request.query.waitMs ?? maxMilestoneWaitMs;
      // ajv coerces "1e400" to Infinity and lets it through every integer check.
      if (!Number.isSafeInteger(waitMs)) throw new VmferryError('VMF_INVALID_ARGUMENT', `invalid request: querystring/waitMs must be an integer from 1 to ${maxMilestoneWaitMs}`);
      // null: no milestone yet; ask again.
      return { milestone: (await sides.useSource(request.params.id, (side) => side.nextMilestone(replySignal(reply), waitMs))) ?? null };
    },
  );
  app.post('/v1/migrations/:id/source/downtime-limit', { schema: { params, body: Type.Object({ ms: Type.Integer({ minimum: 1, maximum: maxDowntimeLimitMs }) }, strict) } }, async (request, reply) => {
    await sides.useSource(request.params.id, (side) => side.setDowntimeLimit(request.body.ms, replySignal(reply)));
    return {};
  });
  app.post('/v1/migrations/:id/source/postcopy', { schema: { params } }, async (request, reply) => {
    await sides.useSource(request.params.id, (side) => side.startPostcopy(replySignal(reply)));
    return {};
  });
  app.post('/v1/migrations/:id/source/postcopy-pause', { schema: { params } }, async (request, reply) => {
    await sides.useSource(request.params.id, (side) => side.pausePostcopy(replySignal(reply)));
    return {};
  });
  app.post('/v1/migrations/:id/source/postcopy-resume', { schema: { params, body: Type.Object({ uri: MigrateBody.properties.uri }, strict) } }, async (request, reply) => {
    await sides.resumePostcopy(request.params.id, request.body.uri, replySignal(reply));
    return {};
  });
  // A host drain's share of its bandwidth budget, changed as its other migrations start and end.
  app.post(
    '/v1/migrations/:id/source/bandwidth',
    { schema: { params, body: Type.Object({ bytesPerSecond: Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER }) }, strict) } },
    async (request, reply) => {
      await sides.useSource(request.params.id, (side) => side.setBandwidth(request.body.bytesPerSecond, replySignal(reply)));
      return {};
    },
  );
  app.post('/v1/migrations/:id/source/release-throttle', { schema: { params } }, async (request, reply) => {
    await sides.useSource(request.params.id, (side) => side.releaseThrottle(replySignal(reply)));
    return {};
  });
  app.post('/v1/migrations/:id/source/stop-guest', { schema: { params } }, async (request, reply) => {
    await sides.useSource(request.params.id, (side) => side.stopGuest(replySignal(reply)));
    return {};
  });
  app.post('/v1/migrations/:id/source/finish-mirrors', { schema: { params } }, (request, reply) =>
    sides.useSource(request.params.id, (side) => side.finishMirrors(replySignal(reply))),
  );
  app.post('/v1/migrations/:id/source/continue', { schema: { params } }, async (request, reply) => {
    await sides.useSource(request.params.id, (side) => side.continueSwitchover(replySignal(reply)));
    faultPoint('source-after-continue');
    return {};
  });
  app.post('/v1/migrations/:id/source/memory-digest', { schema: { params } }, (request, reply) =>
    sides.useSource(request.params.id, (side) => side.memoryDigest(replySignal(reply))),
  );
  app.get('/v1/migrations/:id/source/completed-info', { schema: { params } }, (request, reply) =>
    sides.useSource(request.params.id, (side) => side.completedInfo(replySignal(reply))),
  );
  app.post('/v1/migrations/:id/source/retire', { schema: { params, body: Type.Object({ keepLocalDisks: Type.Boolean() }, strict) } }, async (request) => {
    await sides.retireSource(request.params.id, request.body.keepLocalDisks);
    return {};
  });
  app.post('/v1/migrations/:id/source/rollback', { schema: { params } }, (request) => sides.rollbackSource(request.params.id));

  return { app: base, registry };
}

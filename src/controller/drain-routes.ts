/** The controller's host drain API (drain.ts): start, follow, undrain. */
import { Type } from '@sinclair/typebox';
import type { createApiServer } from '../http/api-server.ts';
import { MigrationParamsSchema } from '../api/agent-types.ts';
import type { DrainService } from './drain.ts';
import { maxDrainParallel } from '../api/drain-limits.ts';

type Api = Awaited<ReturnType<typeof createApiServer>>['app'];

const strict = { additionalProperties: false };
const hostId = Type.String({ minLength: 1, maxLength: 64 });
const HostParams = Type.Object({ host: hostId }, strict);
export const DrainBodySchema = Type.Object(
  {
    to: Type.Optional(Type.Array(hostId, { minItems: 1, maxItems: 64 })),
    parallel: Type.Optional(Type.Integer({ minimum: 1, maximum: maxDrainParallel })),
    bandwidthMiBs: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 1e6 })),
  },
  strict,
);

export function registerDrainRoutes(app: Api, drains: DrainService): void {
  app.post('/v1/hosts/:host/drain', { schema: { params: HostParams, body: DrainBodySchema } }, async (request, reply) => {
    const { to, parallel, bandwidthMiBs } = request.body;
    return reply.status(202).send(await drains.start({ host: request.params.host, to, parallel: parallel ?? 1, bandwidthMiBs }));
  });
  app.post('/v1/hosts/:host/undrain', { schema: { params: HostParams } }, async (request) => {
    await drains.undrain(request.params.host);
    return { host: request.params.host, draining: false };
  });
  app.get('/v1/drains', () => drains.history());
  app.get('/v1/drains/:id', { schema: { params: MigrationParamsSchema } }, (request) => drains.find(request.params.id));
}

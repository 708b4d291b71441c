/**
 * GET /healthz, on every vmferry daemon: what it is, its version and uptime,
 * and the few facts it knows without work (its own checks, no VM started). A
 * daemon that runs but cannot do its job (the controller's store does not
 * answer, the agent finds no QEMU) answers 503 with the reason, so a monitor
 * tells it apart from one that works.
 */
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { describeError } from '../errors.ts';
import { withDeadline } from '../util/abort.ts';
import { vmferryVersion } from '../version.ts';

export interface HealthCheck {
  role: 'controller' | 'agent' | 'storage';
  /** The daemon's own facts, added to the answer; a rejection makes the daemon unhealthy, with its message as the reason. */
  facts: () => Promise<Record<string, unknown>>;
}

/** A check that hangs (a PostgreSQL server that takes the connection and never answers) is a failure, not a hung monitor. */
const checkTimeoutMs = 5_000;

const HealthSchema = Type.Object(
  {
    status: Type.Union([Type.Literal('ok'), Type.Literal('unhealthy')]),
    role: Type.String(),
    version: Type.String(),
    uptimeS: Type.Integer({ description: 'whole seconds since the daemon\'s API was built' }),
    reason: Type.Optional(Type.String({ description: 'why the daemon is unhealthy' })),
  },
  { additionalProperties: true },
);

export function installHealthRoute(app: FastifyInstance, check: HealthCheck): void {
  const startedAt = performance.now();
  app.get('/healthz', { schema: { description: 'liveness and readiness, for monitors and service managers; any role of the cluster may call it', response: { 200: HealthSchema, 503: HealthSchema } } }, async (_request, reply) => {
    const about = { role: check.role, version: vmferryVersion };
    try {
      const facts = await withDeadline('the health check', checkTimeoutMs, undefined, () => check.facts());
      return { status: 'ok', ...about, uptimeS: uptimeS(startedAt), ...facts };
    } catch (err) {
      return reply.status(503).send({ status: 'unhealthy', ...about, uptimeS: uptimeS(startedAt), reason: describeError(err) });
    }
  });
}

function uptimeS(startedAt: number): number {
  return Math.floor((performance.now() - startedAt) / 1000);
}

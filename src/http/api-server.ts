/** The fastify setup every vmferry HTTP API shares: strict typebox validation, coded errors, OpenAPI. */
import AjvCompiler from '@fastify/ajv-compiler';
import swagger from '@fastify/swagger';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from 'fastify';
import type { Logger } from 'pino';
import type { TlsIdentity } from '../security/tls-files.ts';
import { installAccessControl, type AccessPolicy } from './access.ts';
import { installErrorHandler, strictValidation } from './errors.ts';
import { vmferryVersion } from '../version.ts';
import { installHealthRoute, type HealthCheck } from './health.ts';

type ValidatorFactory = NonNullable<NonNullable<NonNullable<Parameters<typeof Fastify>[0]>['schemaController']>['compilersFactory']>['buildValidator'];
type RouteValidation = { httpPart?: string; schema: unknown };

/**
 * Query strings and path parameters arrive as text, so their validator coerces
 * ("force=true" is a boolean); a JSON body already has types, and coercing it
 * would accept {"id": 123} for a string or "yes" for a boolean. fastify has one
 * set of ajv options for every part, so bodies get a second, non-coercing ajv.
 * (@fastify/ajv-compiler is fastify's own validator compiler, installed with it.)
 */
const buildValidator = ((externalSchemas: Parameters<ReturnType<typeof AjvCompiler>>[0], options: { customOptions?: object }) => {
  const pool = AjvCompiler();
  const coercing = pool(externalSchemas, { ...options, customOptions: { ...options.customOptions, coerceTypes: 'array' } });
  const exact = pool(externalSchemas, { ...options, customOptions: { ...options.customOptions, coerceTypes: false } });
  return (route: RouteValidation) => (route.httpPart === 'body' ? exact : coercing)(route);
}) as unknown as ValidatorFactory;

export interface ApiSecurity {
  /** Serve HTTPS, and take only clients with a certificate of this CA (mutual TLS); without it, plain HTTP and no checks. */
  tls?: TlsIdentity;
  /** Which roles may call which route, once TLS tells who calls (access.ts). */
  access: AccessPolicy;
}

/** Every daemon's API: its routes are added by the caller; GET /healthz (with the daemon's `health` facts) is here, so none lacks one. */
export async function createApiServer(title: string, logger: Logger, bodyLimit: number, security: ApiSecurity, health: HealthCheck) {
  // Widened to fastify's logger type, so the instance is the plain FastifyInstance the helpers take.
  const loggerInstance: FastifyBaseLogger = logger;
  // A client without a certificate of the cluster's CA fails the handshake: it never reaches a route.
  const https = security.tls ? { ...security.tls, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' as const } : null;
  // fastify types an HTTPS instance apart from an HTTP one; every route and hook here works on both.
  const base = Fastify({ loggerInstance, https, bodyLimit, ajv: strictValidation, schemaController: { compilersFactory: { buildValidator } },
    // Errors fastify raises before routing (a malformed URL, a 5000-character path parameter) skip
    // the error handler; without this they leave with fastify's own FST_ERR_* codes.
    frameworkErrors: (error, _request, reply: FastifyReply) => {
      const status = error.statusCode && error.statusCode >= 400 && error.statusCode < 500 ? error.statusCode : 400;
      // fastify's own text for an over-long parameter echoes the whole URL first and names the problem last.
      const message = (error as { code?: string }).code === 'FST_ERR_MAX_PARAM_LENGTH' ? 'a path parameter (a name, a host or an id) is longer than 100 characters' : error.message.slice(0, 300);
      void reply.status(status).send({ code: 'VMF_INVALID_ARGUMENT', message: `invalid request: ${message}` });
    },
  }) as unknown as FastifyInstance;
  installErrorHandler(base);
  // Without TLS the daemon said so at start (--insecure, src/cli/tls-options.ts).
  if (security.tls) installAccessControl(base, security.access);
  const app = base.withTypeProvider<TypeBoxTypeProvider>();
  await app.register(swagger, { openapi: { info: { title, version: vmferryVersion } } });
  app.get('/openapi.json', { schema: { hide: true } }, () => app.swagger());
  installHealthRoute(base, health);
  return { base, app };
}

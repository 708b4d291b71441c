/** The fastify setup every vmferry HTTP API shares: strict typebox validation, coded errors, OpenAPI. */
import AjvCompiler from '@fastify/ajv-compiler';
import swagger from '@fastify/swagger';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from 'fastify';
import type { Logger } from 'pino';
import { installErrorHandler, strictValidation } from './errors.ts';

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

export async function createApiServer(title: string, logger: Logger, bodyLimit: number) {
  // Widened to fastify's logger type, so the instance is the plain FastifyInstance the helpers take.
  const loggerInstance: FastifyBaseLogger = logger;
  const base: FastifyInstance = Fastify({ loggerInstance, bodyLimit, ajv: strictValidation, schemaController: { compilersFactory: { buildValidator } },
    // Errors fastify raises before routing (a malformed URL, a 5000-character path parameter) skip
    // the error handler; without this they leave with fastify's own FST_ERR_* codes.
    frameworkErrors: (error, _request, reply: FastifyReply) => {
      const status = error.statusCode && error.statusCode >= 400 && error.statusCode < 500 ? error.statusCode : 400;
      // fastify's own text for an over-long parameter echoes the whole URL first and names the problem last.
      const message = (error as { code?: string }).code === 'FST_ERR_MAX_PARAM_LENGTH' ? 'a path parameter (a name, a host or an id) is longer than 100 characters' : error.message.slice(0, 300);
      void reply.status(status).send({ code: 'VMF_INVALID_ARGUMENT', message: `invalid request: ${message}` });
    },
  });
  installErrorHandler(base);
  const app = base.withTypeProvider<TypeBoxTypeProvider>();
  await app.register(swagger, { openapi: { info: { title, version: '0.1.0' } } });
  app.get('/openapi.json', { schema: { hide: true } }, () => app.swagger());
  return { base, app };
}

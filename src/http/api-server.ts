/** The fastify setup every vmferry HTTP API shares: strict typebox validation, coded errors, OpenAPI. */
import swagger from '@fastify/swagger';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { installErrorHandler, strictValidation } from './errors.ts';

export async function createApiServer(title: string, logger: Logger, bodyLimit: number) {
  // Widened to fastify's logger type, so the instance is the plain FastifyInstance the helpers take.
  const loggerInstance: FastifyBaseLogger = logger;
  const base: FastifyInstance = Fastify({ loggerInstance, bodyLimit, ajv: strictValidation });
  installErrorHandler(base);
  const app = base.withTypeProvider<TypeBoxTypeProvider>();
  await app.register(swagger, { openapi: { info: { title, version: '0.1.0' } } });
  app.get('/openapi.json', { schema: { hide: true } }, () => app.swagger());
  return { base, app };
}

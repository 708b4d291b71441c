/**
 * The web dashboard, served by the controller under /ui/ behind the same TLS
 * and roles as its API (an operator's certificate; `vmferry dashboard` holds
 * one for a browser that has none). The page is plain files
 * (dashboard-web/) and two libraries from node_modules: Preact with htm (one
 * file, no build step) and uPlot. Live data comes from GET /v1/live
 * (event-stream.ts).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { VmferryError } from '../errors.ts';
import type { HostInfo } from '../api/agent-types.ts';
import type { Inventory } from './inventory.ts';

const web = join(import.meta.dirname, 'dashboard-web');
const uplot = join(fileURLToPath(import.meta.resolve('uplot')), '..');

/** Every file the dashboard serves, by its path under /ui/: a fixed list, so no request names a file itself. */
const files: Record<string, { file: string; type: string }> = {
  '': { file: join(web, 'index.html'), type: 'text/html; charset=utf-8' },
  'app.js': { file: join(web, 'app.js'), type: 'text/javascript; charset=utf-8' },
  'style.css': { file: join(web, 'style.css'), type: 'text/css; charset=utf-8' },
  'vendor/preact-htm.js': { file: fileURLToPath(import.meta.resolve('htm/preact/standalone')), type: 'text/javascript; charset=utf-8' },
  'vendor/uplot.js': { file: join(uplot, 'uPlot.esm.js'), type: 'text/javascript; charset=utf-8' },
  'vendor/uplot.css': { file: join(uplot, 'uPlot.min.css'), type: 'text/css; charset=utf-8' },
};

/** The page loads nothing from elsewhere; uPlot and Preact set styles from script, hence 'unsafe-inline' for styles only. */
const contentSecurityPolicy = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'";

export function registerDashboard(app: FastifyInstance, inventory: Inventory): void {
  const typed = app.withTypeProvider<TypeBoxTypeProvider>();
  typed.get('/', { schema: { hide: true } }, async (_request, reply) => reply.redirect('/ui/'));
  typed.get(
    '/ui/*',
    { schema: { hide: true, params: Type.Object({ '*': Type.String({ maxLength: 100 }) }) } },
    async (request, reply) => {
      const entry = files[request.params['*']];
      if (!entry) throw new VmferryError('VMF_NOT_FOUND', `no dashboard file ${request.params['*']}`);
      return reply.type(entry.type).header('content-security-policy', contentSecurityPolicy).header('cache-control', 'no-cache').send(await readFile(entry.file));
    },
  );
  // What the dashboard shows of a host beyond its heartbeat (free memory and pool), asked of its agent when the page looks.
  typed.get('/v1/hosts/:host/info', { schema: { params: Type.Object({ host: Type.String({ minLength: 1, maxLength: 64 }) }) } }, async (request): Promise<HostInfo> =>
    (await inventory.agent(request.params.host)).host(),
  );
}

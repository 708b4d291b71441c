// A command that follows a migration (`migrate`, `migration watch`, the demo) with several --controller URLs:
// when the controller it streams from dies (the leader killed, `demo --ha`), the stream is opened again on the
// next one, which serves it too. It kept asking the dead one: `vmferry demo --ha` ended with ECONNREFUSED.
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, test } from 'node:test';
import { followMigration } from '../../src/cli/progress.ts';
import { ControllerClient } from '../../src/controller/client.ts';
import type { MigrationReport } from '../../src/migration/phases.ts';

let live: Server;
let deadUrl: string;
let liveUrl: string;
const streamed: string[] = [];
const report = { outcome: 'completed', vm: 'web', from: 'A', to: 'B' } as unknown as MigrationReport;

before(async () => {
  // A port nothing listens on: a controller that was killed.
  const dead = createServer();
  await new Promise<void>((resolve) => dead.listen(0, '127.0.0.1', resolve));
  deadUrl = `http://127.0.0.1:${(dead.address() as AddressInfo).port}`;
  await new Promise((resolve) => dead.close(resolve));
  // The standby that took over: any controller serves a migration's stream.
  live = createServer((request, response) => {
    streamed.push(request.url ?? '');
    response.writeHead(200, { 'content-type': 'text/event-stream' });
    response.end(`event: report\ndata: ${JSON.stringify({ id: 'm1', report })}\n\n`);
  });
  await new Promise<void>((resolve) => live.listen(0, '127.0.0.1', resolve));
  liveUrl = `http://127.0.0.1:${(live.address() as AddressInfo).port}`;
});
after(() => new Promise((resolve) => live.close(resolve)));

test('a stream whose controller is gone is read again from the next controller of the list, and the report arrives', async () => {
  const client = new ControllerClient(`${deadUrl},${liveUrl}`);
  const started = Date.now();
  const followed = await followMigration(client, 'm1', 'silent');
  assert.deepEqual(followed, report);
  assert.deepEqual(streamed, ['/v1/migrations/m1/stream?after=0']);
  // One refused connection and one reconnection gap, not the ten tries before giving up.
  assert.ok(Date.now() - started < 5_000, `followed in ${Date.now() - started} ms`);
});

// `npx vmferry demo --ha --json`, as a user runs it (issue 18's done criterion): PostgreSQL and two controllers,
// the leader killed during the first migration, the standby finishing it, both migrations verified. It once ended
// with ECONNREFUSED after the kill (the CLI kept reading the migration's stream from the dead leader), and no test
// ran the demo.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { runVmferry } from '../support/cli.ts';

test('vmferry demo --ha --json: the leader killed during the first migration, the standby finishes it, both migrations verified', async () => {
  const started = Date.now();
  // The demo starts its own cluster; the --controller given here is never asked.
  const demo = await runVmferry('http://127.0.0.1:9', ['--json', 'demo', '--ha'], 600_000);
  assert.equal(demo.code, 0, `the demo failed:\n${demo.stderr}\n${demo.stdout}`);
  const summary = JSON.parse(demo.stdout.trim().split('\n').at(-1) ?? '') as {
    migrations: { from: string; to: string; network?: { tcpIntact: boolean } }[];
    controllers?: { count: number; failovers: number };
    verified: boolean;
  };
  assert.deepEqual(summary.migrations.map((m) => [m.from, m.to]), [['A', 'B'], ['B', 'A']]);
  assert.deepEqual(summary.controllers, { count: 2, failovers: 1 });
  assert.ok(summary.migrations.every((m) => m.network?.tcpIntact), JSON.stringify(summary.migrations.map((m) => m.network)));
  assert.equal(summary.verified, true);
  console.log(`# vmferry demo --ha took ${Date.now() - started} ms`);
});

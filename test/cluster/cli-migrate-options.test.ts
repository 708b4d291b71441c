// `vmferry migrate`'s options: --help shows every default, and what the CLI
// asks the controller for (a stand-in controller records the request and
// answers a dry run's plan), defaults included.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { defaultMigrationOptions } from '../../src/migration/plan.ts';
import { runVmferry, startRecordingController, type CliResult, type RecordingController } from '../support/cli.ts';

let controller: RecordingController;
let requests: Record<string, unknown>[] = [];

const plan = {
  vm: 'web',
  from: 'A',
  to: 'B',
  toAddress: '10.0.0.3',
  disks: [],
  ram: { mode: 'stop-and-copy', memoryMiB: 256, maxDowntimeMs: 300, downtimeLimitsMs: [300], allowPostcopy: false, compareMemory: true },
  options: { ...defaultMigrationOptions, ramMode: 'stop-and-copy', timeoutS: 5, timeoutAction: 'pause', fallback: 'none' },
  refusals: [],
};

before(async () => {
  controller = await startRecordingController(() => ({ status: 200, json: { plan } }));
  requests = controller.requests as Record<string, unknown>[];
});

after(() => controller.close());

function vmferry(...args: string[]): Promise<CliResult> {
  return runVmferry(controller.url, args);
}

test('migrate --help shows the default of every option that has one', async () => {
  const { code, stdout } = await vmferry('migrate', '--help');
  assert.equal(code, 0);
  // One entry per option: its line and the wrapped lines after it (indented deeper, never starting with '-').
  const entries = stdout.split(/\n(?= {2}-)/).map((entry) => entry.replace(/\s+/g, ' ').trim());
  const defaults: [string, string][] = [
    ['--ram-mode <mode>', '(choices: "live", "postcopy", "stop-and-copy", default: "live")'],
    ['--bandwidth <MiB/s>', '(default: unlimited)'],
    ['--max-downtime <ms>', '(default: 300)'],
    ['--timeout <s>', '(default: 600)'],
    ['--timeout-action <action>', '(choices: "abort", "pause", "postcopy", default: "abort")'],
    ['--deadline <s>', '(default: 86400)'],
    ['--stall-timeout <s>', '(default: 30)'],
    ['--fallback <mode>', '(choices: "none", "stop-and-copy", default: "none")'],
    ['--copy-mode <mode>', '(choices: "write-blocking", "background", default: "write-blocking")'],
  ];
  for (const [option, shown] of defaults) {
    const entry = entries.find((e) => e.startsWith(option));
    assert.ok(entry?.endsWith(shown), `${option} shows ${shown}: ${entry}`);
  }
});

test('the options become the migrate request, every default explicit', async () => {
  requests.length = 0;
  const given = await vmferry('migrate', 'web', '--to', 'B', '--dry-run', '--ram-mode', 'stop-and-copy', '--timeout', '5', '--timeout-action', 'pause', '--deadline', '900', '--fallback', 'stop-and-copy');
  assert.equal(given.code, 0, given.stderr);
  assert.match(given.stdout, /stop-and-copy: the guest stopped once the disks are in sync, RAM in one pass, after 5 s of RAM: pause/);
  const defaults = await vmferry('migrate', 'web', '--to', 'B', '--dry-run');
  assert.equal(defaults.code, 0, defaults.stderr);
  const common = { vm: 'web', to: 'B', dryRun: true, maxDowntimeMs: 300, stallTimeoutS: 30, copyMode: 'write-blocking' };
  const noStop = await vmferry('migrate', 'web', '--to', 'B', '--dry-run', '--no-tcg-stop-copy');
  assert.equal(noStop.code, 0, noStop.stderr);
  const live = { ...common, ramMode: 'live', timeoutS: 600, timeoutAction: 'abort', deadlineS: 86400, fallback: 'none' };
  assert.deepEqual(requests, [
    { ...common, ramMode: 'stop-and-copy', timeoutS: 5, timeoutAction: 'pause', deadlineS: 900, fallback: 'stop-and-copy' },
    live,
    { ...live, tcgStopCopy: false },
  ]);
});

test('a RAM mode or timeout action that does not exist is refused, naming the choices', async () => {
  const mode = await vmferry('migrate', 'web', '--to', 'B', '--ram-mode', 'fast');
  assert.notEqual(mode.code, 0);
  assert.match(mode.stderr, /--ram-mode <mode>' argument 'fast' is invalid\. Allowed choices are live, postcopy, stop-and-copy/);
  const action = await vmferry('migrate', 'web', '--to', 'B', '--timeout-action', 'suspend');
  assert.notEqual(action.code, 0);
  assert.match(action.stderr, /Allowed choices are abort, pause, postcopy/);
  const timeout = await vmferry('migrate', 'web', '--to', 'B', '--timeout', '-1');
  assert.notEqual(timeout.code, 0);
  assert.match(timeout.stderr, /--timeout must be a positive number \(got "-1"\)/);
});

#!/usr/bin/env node
// Runs node's test runner on every *.test.ts under test/ (Node 20 does not glob).
// Files that boot QEMU run one at a time: two such files at once on a 2-core
// machine only make both slower and their timeouts flaky. The files below that
// start no QEMU (and build no network namespaces) run meanwhile, one at a time
// in a second runner; their report follows the first one's. Last comes a summary
// (scripts/test-summary-reporter.js gathers it): every failed test with its file and
// error, and the slowest files, so that the tail of a CI log says what failed and why.
//
//   node scripts/run-tests.js                 all tests
//   node scripts/run-tests.js test/nbd        only files under a folder (or single files)
//   node scripts/run-tests.js --lint          all tests, and `npm run lint` first in the second runner's
//                                             turn (npm test): its two single-threaded minutes then use the
//                                             core the QEMU files leave, instead of delaying them
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '..');

// The tests start the CLI and the daemons through bin/vmferry.js, which runs dist/ when it is as new
// as src/ (else the sources, through tsx, much slower to start): build it first. Nothing
// to do, silently, when no source changed since the last build.
const build = spawnSync(process.execPath, [join(root, 'scripts/build.js')], { stdio: 'inherit' });
if (build.status !== 0) process.exit(build.status ?? 1);

/** Folders and files whose tests start no QEMU: a file not listed here runs with the QEMU ones. */
const qemuFree = [
  'test/unit/',
  'test/nbd/',
  'test/fuzz/',
  'test/agent/request-guard.test.ts',
  'test/agent/spec-durability.test.ts',
  'test/chaos/advertise-url.test.ts',
  'test/chaos/fault-proxy.test.ts',
  'test/cluster/api.test.ts',
  'test/cluster/event-stream.test.ts',
  'test/cluster/ops-endpoints.test.ts',
  'test/cluster/service-units.test.ts',
  'test/cluster/store-durability.test.ts',
  'test/migration/convergence.test.ts',
  'test/migration/executor.test.ts',
  'test/migration/plan.test.ts',
  'test/qemu/socket-nodelay.test.ts',
  'test/qemu/spec.test.ts',
  'test/qmp/malformed-peer.test.ts',
  'test/security/api-access.test.ts',
  'test/security/nbd-tls.test.ts',
  'test/security/tls-files.test.ts',
  'test/storage/bad-input.test.ts',
  'test/storage/cached-read.test.ts',
  'test/storage/disk-images.test.ts',
  'test/storage/durability.test.ts',
  'test/storage/holes.test.ts',
  'test/storage/metrics.test.ts',
  'test/storage/peers.test.ts',
  'test/storage/volume-lifecycle.test.ts',
  'test/store/ha-controllers.test.ts',
  'test/store/pg-checkout.test.ts',
  'test/support/power-loss/',
];

/**
 * Files with an npm script of their own, run only when named: they cost more than npm test's budget
 * allows (test/migration/rbd.test.ts starts a Ceph cluster and migrates five times: `npm run test:ceph`; the
 * short version in npm test is test/storage/rbd-fence.test.ts, the fence and the probe on one Ceph cluster;
 * test/cluster/drain.test.ts drains three writing guests off a host, about two minutes: `npm run test:drain`,
 * with the budget's arithmetic in npm test as test/unit/drain.test.ts and the retries as test/unit/retry.test.ts).
 */
const ownScript = ['test/migration/rbd.test.ts', 'test/cluster/drain.test.ts'];

function collect(path) {
  if (statSync(path).isFile()) return path.endsWith('.test.ts') ? [path] : [];
  return readdirSync(path)
    .sort()
    .flatMap((name) => collect(join(path, name)));
}

const lint = process.argv.includes('--lint');
const targets = process.argv.slice(2).filter((arg) => arg !== '--lint');
const files = (targets.length ? targets : ['test'])
  .flatMap((target) => collect(resolve(root, target)))
  .map((file) => relative(root, file))
  .filter((file) => !ownScript.includes(file) || targets.some((target) => resolve(root, target) === resolve(root, file)));
if (files.length === 0) {
  console.error(`no test files under ${targets.join(' ') || 'test'}`);
  process.exit(1);
}

const isQemuFree = (file) => qemuFree.some((entry) => (entry.endsWith('/') ? file.startsWith(entry) : file === entry));
const groups = [files.filter((f) => !isQemuFree(f)), files.filter(isQemuFree)].filter((group) => group.length > 0);

const summaryReporter = join(root, 'scripts/test-summary-reporter.js');
const summaryDir = mkdtempSync(join(tmpdir(), 'vmferry-test-summary-'));

/** Runs one group; the first writes to this terminal as it goes, a second's report is kept for the end. */
function runGroup(group, index) {
  const live = index === 0;
  const summaryFile = join(summaryDir, `group-${index}.json`);
  const reporters = ['--test-reporter=spec', '--test-reporter-destination=stdout', `--test-reporter=${summaryReporter}`, `--test-reporter-destination=${summaryFile}`];
  const child = spawn(process.execPath, ['--import', 'tsx', '--test', '--test-concurrency=1', ...reporters, ...group], {
    cwd: root,
    stdio: ['ignore', live ? 'inherit' : 'pipe', live ? 'inherit' : 'pipe'],
  });
  const output = [];
  child.stdout?.on('data', (chunk) => output.push(chunk));
  child.stderr?.on('data', (chunk) => output.push(chunk));
  return new Promise((resolveRun) => {
    child.on('close', (code, signal) => resolveRun({ status: code ?? (signal ? 1 : 0), signal, output: Buffer.concat(output), summaryFile }));
  });
}

/** Lines of a failed lint's output the summary repeats. */
const lintLines = 20;

/** `npm run lint`, niced: the QEMU files beside it are the ones with timeouts. Its output is kept for the end. */
function runLint() {
  const child = spawn('nice', ['-n', '10', 'npm', 'run', '--silent', 'lint'], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  const output = [];
  child.stdout.on('data', (chunk) => output.push(chunk));
  child.stderr.on('data', (chunk) => output.push(chunk));
  return new Promise((resolveRun) => {
    child.on('close', (code, signal) => resolveRun({ status: code ?? (signal ? 1 : 0), output: Buffer.concat(output) }));
  });
}

/** How many of the slowest files the summary lists. */
const slowestShown = 15;

/** The failures and the slowest files of every group, for the end of the output. */
function summary(results, linted) {
  const failures = [];
  const files = [];
  const lines = ['', '# Summary'];
  if (linted && linted.status !== 0) {
    const output = linted.output.toString().trimEnd().split('\n');
    lines.push('', `✖ npm run lint failed (exit ${linted.status}); its last lines:`, ...output.slice(-lintLines).map((line) => `    ${line}`), '');
  }
  for (const [index, result] of results.entries()) {
    let gathered;
    try {
      gathered = JSON.parse(readFileSync(result.summaryFile, 'utf8'));
    } catch (err) {
      lines.push(`# the runner of ${groups[index].length} files left no summary (${result.signal ? `killed by ${result.signal}` : `exit ${result.status}`}; ${err.message}): see its report above`);
      continue;
    }
    failures.push(...gathered.failures);
    files.push(...gathered.files);
  }
  const shown = (file) => relative(root, file ?? '(no file)');
  if (failures.length > 0) {
    lines.push(`# ${failures.length} failed:`);
    for (const failure of failures) lines.push('', `✖ ${shown(failure.file)}: ${failure.name}`, ...failure.error.map((line) => `    ${line}`));
    lines.push('');
  }
  files.sort((a, b) => b.seconds - a.seconds);
  lines.push(`# slowest files (wall seconds, of ${files.length}; the first group runs its files one after another):`);
  for (const { file, seconds } of files.slice(0, slowestShown)) lines.push(`${seconds.toFixed(1).padStart(8)}  ${shown(file)}`);
  return `${lines.join('\n')}\n`;
}

// The second turn: the lint, then the files that start no QEMU, while the first group runs.
const [firstRun, secondTurn] = await Promise.all([
  runGroup(groups[0], 0),
  (async () => {
    const linted = lint ? await runLint() : undefined;
    return { linted, second: groups[1] ? await runGroup(groups[1], 1) : undefined };
  })(),
]);
const { linted, second } = secondTurn;
const results = second ? [firstRun, second] : [firstRun];
if (linted) {
  process.stdout.write(`\n# npm run lint, run alongside the files above: ${linted.status === 0 ? 'passed' : `FAILED (exit ${linted.status})`}\n\n`);
  process.stdout.write(linted.output);
}
if (second) {
  process.stdout.write(`\n# ${groups[1].length} files that start no QEMU, run alongside the ones above:\n\n`);
  process.stdout.write(second.output);
}
process.stdout.write(summary(results, linted));
rmSync(summaryDir, { recursive: true, force: true });
process.exit(results.some((r) => r.status !== 0) || (linted && linted.status !== 0) ? 1 : 0);

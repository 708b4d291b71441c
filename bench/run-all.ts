/**
 * Runs every benchmark in turn, each in its own node process (so one's
 * arguments, failures and leftovers cannot touch the next), and prints a
 * summary. Exits 0 when every benchmark did.
 *
 *   npm run bench                      full sizes (about 30 minutes on 2 cores)
 *   npm run bench -- --small           smaller sizes (a few minutes)
 *   npm run bench -- --only migration,growth
 */
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { small: { type: 'boolean', default: false }, only: { type: 'string' } } });
const small = values.small ?? false;
const root = resolve(import.meta.dirname, '..');
const scratch = join(root, '.scratch');

interface Bench {
  name: string;
  script: string;
  args: string[];
}

const benches: Bench[] = [
  { name: 'storage', script: 'storage-fio.ts', args: small ? ['--seconds', '4', '--size-mib', '256'] : [] },
  { name: 'migration', script: 'migration.ts', args: small ? ['--small'] : [] },
  { name: 'growth', script: 'growth.ts', args: small ? ['--small'] : [] },
  // Small runs keep the committed full-size plot in docs/ as it is.
  { name: 'progress', script: 'progress.ts', args: small ? ['--small', '--out', join(scratch, 'migration-progress-small.svg')] : ['--out', join(root, 'docs/migration-progress.svg')] },
  { name: 'io-path', script: 'io-path.ts', args: small ? ['--small'] : [] },
  { name: 'tcg-downtime-start', script: 'tcg-downtime-start.ts', args: small ? ['--runs', '1'] : [] },
];

function run(bench: Bench): Promise<number> {
  return new Promise((done) => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'bench', bench.script), ...bench.args], { stdio: 'inherit', cwd: root });
    child.once('error', () => done(127));
    child.once('exit', (code, signal) => done(code ?? (signal ? 128 : 1)));
  });
}

const only = values.only?.split(',').map((s) => s.trim());
const unknown = only?.filter((name) => !benches.some((b) => b.name === name)) ?? [];
if (unknown.length > 0) {
  console.error(`unknown benchmark(s): ${unknown.join(', ')}; known: ${benches.map((b) => b.name).join(', ')}`);
  process.exit(2);
}
if (small) mkdirSync(scratch, { recursive: true });
const outcomes: { name: string; code: number; seconds: number }[] = [];
for (const bench of benches.filter((b) => !only || only.includes(b.name))) {
  const started = Date.now();
  console.log(`\n######## ${bench.name}: node --import tsx bench/${bench.script} ${bench.args.join(' ')}`);
  const code = await run(bench);
  outcomes.push({ name: bench.name, code, seconds: Math.round((Date.now() - started) / 1000) });
}
console.log('\nbenchmarks:');
for (const o of outcomes) console.log(`  ${o.name.padEnd(10)} ${o.code === 0 ? 'ok' : `FAILED (exit ${o.code})`}  ${o.seconds} s`);
process.exitCode = outcomes.every((o) => o.code === 0) ? 0 : 1;

// npm run chaos -- --runs N --seed S [--from I] [--json]: the seeded chaos
// campaign (test/chaos/campaign.ts). Run I of seed S is always the same fault
// at the same phase and delay: `--seed S --from I --runs 1` replays it.
// Progress goes to stderr; stdout gets the table and, last, the summary line.
// Exits 1 when any run has a finding or the harness failed in a run.
import { Command } from 'commander';
import pino from 'pino';
import { table } from '../src/cli/render.ts';
import { ChaosCampaign, hasFindings, summarize, type RunResult } from '../test/chaos/campaign.ts';
import { findingKinds } from '../test/chaos/checks.ts';
import { faultKinds, type FaultKind } from '../test/chaos/draw.ts';
import { makeTempDir } from '../test/support/temp.ts';

function nonNegativeInteger(text: string, option: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${option} must be a whole number, 0 or more (got "${text}")`);
  return n;
}

const program = new Command('chaos')
  .option('--runs <n>', 'how many runs', '10')
  .option('--seed <s>', 'the campaign seed (default: a fresh one, printed)')
  .option('--from <i>', 'number of the first run', '0')
  .option('--kinds <list>', `only these faults, comma-separated (${faultKinds.join(', ')})`)
  .option('--json', 'print only the summary, as one JSON line')
  .parse();
const opts = program.opts<{ runs: string; seed?: string; from: string; kinds?: string; json?: boolean }>();

const runs = nonNegativeInteger(opts.runs, '--runs');
const seed = opts.seed === undefined ? Math.floor(Math.random() * 2 ** 32) : nonNegativeInteger(opts.seed, '--seed') >>> 0;
const from = nonNegativeInteger(opts.from, '--from');
const kinds = opts.kinds?.split(',').map((k) => k.trim()) ?? [...faultKinds];
const unknown = kinds.filter((k) => !(faultKinds as readonly string[]).includes(k));
if (unknown.length) throw new Error(`--kinds: unknown fault ${unknown.join(', ')} (known: ${faultKinds.join(', ')})`);
if (process.getuid?.() !== 0) throw new Error('the chaos campaign builds network namespaces and must run as root');

const work = await makeTempDir('chaos');
const started = Date.now();
const campaign = await ChaosCampaign.create({
  workDir: work.path,
  logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
  network: { prefix: 'vmfx', subnet: '10.213.47', hostLinkSubnet: '10.213.48' },
  onRun: (r) => process.stderr.write(`run ${r.run} (seed ${r.seed}): ${r.kind} aimed at ${r.phase}+${r.delayMs} ms, hit in ${r.hitIn} (${r.note}); ${r.outcome}; ${describe(r)} [${r.seconds.toFixed(1)} s: ${JSON.stringify(r.stages)}]\n`),
});
// Interrupted: the cluster's processes, namespaces and files go all the same.
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    process.stderr.write(`chaos: ${signal}, cleaning up\n`);
    void campaign.close().finally(() => work.remove().finally(() => process.exit(130)));
  });
}
process.stderr.write(`chaos: seed ${seed}, runs ${from}..${from + runs - 1}${campaign.dropsUnsyncedWrites ? '' : ' (power loss: kill only, test/support/power-loss/ absent)'}\n`);
let results: RunResult[] = [];
try {
  results = await campaign.run(seed, Array.from({ length: runs }, (_, i) => from + i), kinds as FaultKind[]);
} finally {
  await campaign.close();
  await work.remove();
}

function describe(r: RunResult): string {
  const found = findingKinds.flatMap((k) => (r.findings[k] ?? []).map((text) => `${k}: ${text}`));
  if (r.error) found.push(`harness error: ${r.error}`);
  return found.length ? found.join(' | ') : 'no finding';
}

const summary = summarize(seed, results);
const errors = results.filter((r) => r.error).length;
const seconds = (Date.now() - started) / 1000;
if (!opts.json) {
  console.log(
    table(
      ['run', 'fault', 'aimed at', 'delay ms', 'hit in', 'outcome', 'findings', 's'],
      results.map((r) => [r.run, r.kind, r.phase, r.delayMs, r.hitIn, r.outcome, describe(r).slice(0, 300), r.seconds.toFixed(1)]),
    ),
  );
  console.log(`${results.length} runs in ${seconds.toFixed(0)} s (${(seconds / Math.max(1, results.length)).toFixed(1)} s per run), ${errors} harness errors`);
} else {
  process.stderr.write(`${results.length} runs in ${seconds.toFixed(0)} s (${(seconds / Math.max(1, results.length)).toFixed(1)} s per run), ${errors} harness errors\n`);
}
console.log(JSON.stringify(summary));
process.exitCode = hasFindings(summary) || errors > 0 ? 1 : 0;

// A short fixed-seed chaos campaign (test/chaos/campaign.ts): runs of seed
// 2026 picked for the faults around the switch-over that matter most and no
// other test makes: the lost reply to the destination's resume, a power loss
// of the destination just after the migration completed (the controller
// killed while switching over, run 21, is test/faults/migration-faults.test.ts's
// "controller killed just after the destination resumed"). After each the guest runs on
// exactly one host with every acknowledged write, nothing is left behind,
// and vmferry says where it runs. `npm run chaos -- --seed 2026 --from <run> --runs 1`
// replays one of them with its details.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { ChaosCampaign, summarize, type RunResult } from './campaign.ts';
import { findingKinds } from './checks.ts';
import { makeTempDir } from '../support/temp.ts';

const seed = 2026;
/** lost-reply (/destination/resume), power-loss-b (completed). */
const runs = [45, 48];

test(`chaos campaign, seed ${seed}, runs ${runs.join(', ')}: no guest twice, none lost, no acknowledged write lost, nothing left, nothing misreported`, async () => {
  assert.equal(process.getuid?.(), 0, 'the chaos campaign builds network namespaces and needs root (CI runs as root)');
  const work = await makeTempDir('chaos-test');
  const campaign = await ChaosCampaign.create({
    workDir: work.path,
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    network: { prefix: 'vmfy', subnet: '10.213.57', hostLinkSubnet: '10.213.58' },
  });
  let results: RunResult[] = [];
  try {
    results = await campaign.run(seed, runs);
  } finally {
    await campaign.close();
    await work.remove();
  }
  const details = results.map((r) => ({
    run: r.run,
    fault: `${r.kind} aimed at ${r.phase}+${r.delayMs} ms, hit in ${r.hitIn} (${r.note})`,
    outcome: r.outcome,
    findings: Object.fromEntries(findingKinds.filter((k) => r.findings[k]).map((k) => [k, r.findings[k]])),
    error: r.error,
    seconds: r.seconds,
    stages: r.stages,
  }));
  assert.deepEqual(results.filter((r) => r.error).map((r) => `run ${r.run}: ${r.error}`), [], 'the harness ran every run to its end');
  const summary = summarize(seed, results);
  assert.deepEqual(
    findingKinds.map((k) => [k, summary[k]]),
    findingKinds.map((k) => [k, 0]),
    `findings:\n${JSON.stringify(details, null, 2)}`,
  );
});

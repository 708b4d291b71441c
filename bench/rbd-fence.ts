/**
 * The RBD switch-over fence alone, the way a migration's destination runs it
 * in the guest's pause (RbdWriter.fenceOthers, src/storage/rbd-fence.ts): an
 * image held by a stale writer (qemu-io) and by the new one, the new one's
 * clients learnt, then every other client blocklisted. Two paths, alternating
 * round after round on one throwaway Ceph cluster (src/demo/ceph.ts): through
 * the helper started beforehand (readyFence, as at prepare), and through the
 * `rbd` and `ceph` programs (the fallback when the helper cannot start).
 * Each fence comes `--gap` seconds, plus a random 0–5 s, after the last thing
 * the round did, as the switch-over comes seconds after prepare: the random
 * part puts the fences at any point of the monitor's own cycle of commits
 * (a blocklist entry waits for the next one that may go). Each round checks
 * that the stale writer's writes are refused afterwards.
 *
 *   node --import tsx bench/rbd-fence.ts [--rounds 8] [--gap 2]
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { startCeph } from '../src/demo/ceph.ts';
import type { VmSpec } from '../src/qemu/spec.ts';
import { RbdWriter, rbdWatchers } from '../src/storage/rbd-fence.ts';
import { createImage, type RbdImageRef } from '../src/storage/rbd.ts';
import { QemuIo } from '../test/support/ceph.ts';
import { machineLine, mib, withCleanup } from './lib/common.ts';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '8' }, gap: { type: 'string', default: '2' } } });
const rounds = Number(values.rounds);
const gapMs = Number(values.gap) * 1000;
if (!Number.isInteger(rounds) || rounds <= 0) throw new Error(`--rounds must be a positive whole number (got ${String(values.rounds)})`);
if (!Number.isFinite(gapMs) || gapMs < 0) throw new Error(`--gap must be a number of seconds (got ${String(values.gap)})`);

type Path = 'helper' | 'cli';

/** One fence of `ref` by a new writer against a stale one; returns how long fenceOthers took, in ms. */
async function fenceOnce(ref: RbdImageRef, path: Path): Promise<number> {
  const spec: VmSpec = { name: 'bench', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: '/nonexistent' }, disks: [{ id: 'data', source: { kind: 'rbd', ...ref } }] };
  const stale = await QemuIo.open(ref);
  let next: QemuIo | undefined;
  try {
    const earlier = await rbdWatchers(spec);
    next = await QemuIo.open(ref);
    const writer = await RbdWriter.learn(spec, earlier);
    if (path === 'helper') {
      await writer.readyFence();
      if (writer.fenceHelperPid === undefined) throw new Error('the fence helper did not start');
    }
    await sleep(gapMs + Math.random() * 5_000);
    const started = performance.now();
    const fenced = await writer.fenceOthers();
    const ms = performance.now() - started;
    if (fenced.get('data')?.length !== 1) throw new Error(`fenced ${JSON.stringify([...fenced])}, not the one stale writer`);
    for (let i = 0; !/write failed/.test(await stale.run('write -P 0x33 0 4k')); i++) {
      if (i >= 100) throw new Error('the fenced writer could still write 5 s after the fence');
      await sleep(50);
    }
    return ms;
  } finally {
    await stale.close();
    await next?.close();
  }
}

await withCleanup(async (cleanup) => {
  console.log(`\n== The RBD switch-over fence alone: through its helper and through the CLI, ${rounds} round(s), ${gapMs / 1000} s + 0–5 s before each fence`);
  console.log(await machineLine());
  const ceph = await startCeph();
  cleanup.add('stop the Ceph cluster', () => ceph.stop());
  await createImage(ceph.client, ceph.pool, 'fence', 16 * mib);
  const ref: RbdImageRef = { pool: ceph.pool, image: 'fence', ...ceph.client };
  const times: Record<Path, number[]> = { helper: [], cli: [] };
  for (let round = 1; round <= rounds; round++) {
    // Which goes first swaps every round, so a load that comes and goes hits both alike.
    const paths: Path[] = round % 2 === 1 ? ['helper', 'cli'] : ['cli', 'helper'];
    for (const path of paths) times[path].push(await fenceOnce(ref, path));
  }
  const rows = (['helper', 'cli'] as const).map((path) => {
    const sorted = [...times[path]].sort((a, b) => a - b);
    const at = (q: number): string => `${Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN)} ms`;
    return [path === 'helper' ? 'helper (started beforehand)' : 'rbd + ceph programs', String(sorted.length), at(0), at(0.5), at(1), times[path].map((ms) => Math.round(ms)).join(' ')];
  });
  console.log(table(['fence through', 'fences', 'min', 'median', 'max', 'each, in order (ms)'], rows));
});

/**
 * What a rolled-back source's new RBD client costs (src/migration/rbd-client-swap.ts):
 * a paused VM with one writable RBD disk, on a throwaway Ceph cluster
 * (src/demo/ceph.ts). Each round blocklists the disk's current client, as a
 * destination's fence does, then times renewRbdClients, which the guest's pause
 * holds at a rollback: the `rbd status` that checks the cluster answers, the
 * new client's blockdev-add, the raw node's reopen, the old client's
 * blockdev-del. `rbd status` alone is timed too, for its share.
 *
 *   node --import tsx bench/rbd-client-swap.ts [--rounds 6]
 */
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { startCeph } from '../src/demo/ceph.ts';
import { testGuestSpec } from '../src/guest/test-guest.ts';
import { renewRbdClients } from '../src/migration/rbd-client-swap.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import { blocklistClient, createImage, imageWatchers } from '../src/storage/rbd.ts';
import { makeTempDir } from '../test/support/temp.ts';
import { machineLine, withCleanup } from './lib/common.ts';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '6' } } });
const rounds = Number(values.rounds);
if (!Number.isInteger(rounds) || rounds <= 0) throw new Error(`--rounds must be a positive whole number (got ${String(values.rounds)})`);

await withCleanup(async (cleanup) => {
  console.log(`\n== A new librbd client for a paused VM's fenced RBD disk, ${rounds} round(s)`);
  console.log(await machineLine());
  const ceph = await startCeph();
  cleanup.add('stop the Ceph cluster', () => ceph.stop());
  const temp = await makeTempDir('rbd-client-swap');
  cleanup.add('remove the temp dir', () => temp.remove());
  await createImage(ceph.client, ceph.pool, 'swap', 32 * 1024 * 1024);
  const spec = testGuestSpec('rbdswap', [{ id: 'data', source: { kind: 'rbd', pool: ceph.pool, image: 'swap', ...ceph.client } }], temp.path, { mode: 'workload', spanMiB: 8 });
  const vm = await QemuProcess.start(spec, { runDir: join(temp.path, 'run'), mode: 'paused' });
  cleanup.add('stop the QEMU', () => vm.kill());
  const rows: string[][] = [];
  for (let round = 1; round <= rounds; round++) {
    const fenced = await imageWatchers(ceph.client, ceph.pool, 'swap');
    for (const address of fenced) await blocklistClient(ceph.client, address);
    const swapStarted = performance.now();
    const swaps = await renewRbdClients(vm, AbortSignal.timeout(60_000));
    const swapMs = performance.now() - swapStarted;
    if (swaps.length !== 1) throw new Error(`round ${round}: the disk's client was not swapped`);
    const checkStarted = performance.now();
    const clients = await imageWatchers(ceph.client, ceph.pool, 'swap');
    const checkMs = performance.now() - checkStarted;
    if (clients.length !== 1 || fenced.includes(clients[0] ?? '')) throw new Error(`round ${round}: the image's clients are ${clients.join(', ')}, the fenced ones were ${fenced.join(', ')}`);
    rows.push([String(round), `${Math.round(swapMs)} ms`, `${Math.round(checkMs)} ms`, `${swaps[0]?.from.join(', ')} -> ${swaps[0]?.to}`]);
  }
  console.log(table(['round', 'renewRbdClients', 'rbd status alone', 'client node'], rows));
});

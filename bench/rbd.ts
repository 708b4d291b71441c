/**
 * What the path through QEMU costs on Ceph RBD, on a throwaway single-node
 * cluster (src/demo/ceph.ts): fio's own `rbd` engine (librbd, no QEMU) against
 * QEMU's rbd block driver (librbd inside QEMU's block layer, run by
 * `qemu-img bench`), job by job on the same pool, each side on an image of its
 * own, both at librbd's default cache. qemu-img bench issues requests at a
 * fixed step rather than at random offsets, so fio is given the same stride:
 * 4 KiB requests 4 MiB + 4 KiB apart touch a different RBD object each time,
 * as random requests would. qemu-img bench runs a request count, taken from
 * what fio did in its time, so both run about as long.
 *
 * Then the test guest on an RBD disk: it has no fio, only its bulk writer
 * (1 MiB O_DIRECT writes, one at a time), measured by QEMU's count of bytes
 * the guest wrote (query-blockstats) and set against fio doing the same
 * (1 MiB sequential writes, queue depth 1). The guest runs under TCG here, so
 * its row includes emulating the guest.
 *
 *   node --import tsx bench/rbd.ts [--seconds 10] [--image-mib 512]
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { startCeph, type TestCeph } from '../src/demo/ceph.ts';
import { reportLogOf, testGuestSpec, waitForAcks } from '../src/guest/test-guest.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import { createImage } from '../src/storage/rbd.ts';
import { makeTempDir } from '../test/support/temp.ts';
import { execFile, hostSync, machineLine, mib, ratio, withCleanup } from './lib/common.ts';

const { values } = parseArgs({ options: { seconds: { type: 'string', default: '10' }, 'image-mib': { type: 'string', default: '512' } } });
const seconds = Number(values.seconds);
const imageMiB = Number(values['image-mib']);
for (const [name, value] of [['--seconds', seconds], ['--image-mib', imageMiB]] as const) {
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive whole number (got ${String(value)})`);
}

interface Job {
  name: string;
  write: boolean;
  blockBytes: number;
  depth: number;
  /** Bytes from one request's start to the next one's. */
  stepBytes: number;
}

const KiB = 1024;
const jobs: Job[] = [
  { name: '4k strided write, qd32', write: true, blockBytes: 4 * KiB, depth: 32, stepBytes: 4 * mib + 4 * KiB },
  { name: '4k strided read, qd32', write: false, blockBytes: 4 * KiB, depth: 32, stepBytes: 4 * mib + 4 * KiB },
  { name: '1M sequential write, qd16', write: true, blockBytes: mib, depth: 16, stepBytes: mib },
  { name: '1M sequential read, qd16', write: false, blockBytes: mib, depth: 16, stepBytes: mib },
  // The test guest's own pattern, so its row below has QEMU's share without the guest's to compare with.
  { name: '1M sequential write, qd1', write: true, blockBytes: mib, depth: 1, stepBytes: mib },
];

interface Rate {
  iops: number;
  mibs: number;
}

async function fio(ceph: TestCeph, image: string, job: Job, extra: string[] = []): Promise<Rate> {
  const skip = job.stepBytes - job.blockBytes;
  const rw = `${job.write ? 'write' : 'read'}${skip > 0 ? `:${skip}` : ''}`;
  const { stdout } = await execFile(
    'fio',
    ['--name=rbd', '--ioengine=rbd', `--clientname=${ceph.client.user}`, `--pool=${ceph.pool}`, `--rbdname=${image}`, `--rw=${rw}`, `--bs=${job.blockBytes}`,
      `--iodepth=${job.depth}`, '--time_based', `--runtime=${seconds}`, '--output-format=json', ...extra],
    // fio's librbd finds the cluster through the conf the environment names.
    { env: { ...process.env, CEPH_CONF: ceph.client.conf }, timeout: (seconds + 60) * 1000, maxBuffer: 16 * mib },
  );
  const result = (JSON.parse(stdout) as { jobs: { read: { iops: number; bw_bytes: number }; write: { iops: number; bw_bytes: number } }[] }).jobs[0];
  if (!result) throw new Error(`fio printed no job: ${stdout.slice(0, 500)}`);
  const side = job.write ? result.write : result.read;
  return { iops: side.iops, mibs: side.bw_bytes / mib };
}

async function qemuImgBench(ceph: TestCeph, image: string, job: Job, count: number): Promise<Rate> {
  const args = ['bench', '-t', 'writeback', '-c', String(count), '-d', String(job.depth), '-s', String(job.blockBytes), '-S', String(job.stepBytes)];
  if (job.write) args.push('-w');
  args.push(`json:${JSON.stringify({ driver: 'raw', file: { driver: 'rbd', pool: ceph.pool, image, ...ceph.client } })}`);
  const { stdout } = await execFile('qemu-img', args, { timeout: (seconds * 5 + 60) * 1000 });
  const took = /Run completed in ([\d.]+) seconds/.exec(stdout);
  if (!took) throw new Error(`qemu-img bench printed no time: ${stdout}`);
  const s = Number(took[1]);
  return { iops: count / s, mibs: (count * job.blockBytes) / mib / s };
}

async function guestWrites(ceph: TestCeph, dir: string, image: string): Promise<Rate> {
  return withCleanup(async (cleanup) => {
    const logs = join(dir, 'logs');
    mkdirSync(logs, { recursive: true });
    const disk = { id: 'io0', source: { kind: 'rbd' as const, pool: ceph.pool, image, ...ceph.client } };
    const spec = testGuestSpec('rbdio', [disk], logs, { mode: 'workload', spanMiB: 8, bulkMiBs: 4000, bulkDisks: ['io0'], intervalMs: 1000 }, 256);
    await hostSync();
    const vm = await QemuProcess.start(spec, { runDir: join(dir, 'run') });
    cleanup.add('stop QEMU', () => vm.kill());
    await waitForAcks([reportLogOf(spec)], ['io0'], { atLeast: 2, timeoutMs: 120_000 });
    await sleep(2000); // bulk writes in full swing
    const written = async (): Promise<number> => {
      const stats = await vm.monitor.client.execute<{ qdev?: string; stats: { wr_bytes: number; wr_operations: number } }[]>('query-blockstats');
      return stats.find((s) => s.qdev?.includes('/io0/'))?.stats.wr_bytes ?? 0;
    };
    const t0 = performance.now();
    const b0 = await written();
    await sleep(seconds * 1000);
    const b1 = await written();
    const s = (performance.now() - t0) / 1000;
    return { iops: (b1 - b0) / mib / s, mibs: (b1 - b0) / mib / s };
  });
}

const fmt = (rate: Rate, big: boolean): string => (big ? `${rate.mibs.toFixed(1)} MiB/s` : `${Math.round(rate.iops)} IOPS`);

await withCleanup(async (cleanup) => {
  console.log(`\n== Ceph RBD: fio's rbd engine vs QEMU's rbd driver (qemu-img bench) vs the test guest, ${seconds} s per job, ${imageMiB} MiB images`);
  console.log(await machineLine());
  const temp = await makeTempDir('bench-rbd');
  cleanup.add('remove temp dir', () => temp.remove());
  const ceph = await startCeph();
  cleanup.add('stop the Ceph cluster', () => ceph.stop());
  for (const image of ['fio', 'qemu', 'guest']) await createImage(ceph.client, ceph.pool, image, imageMiB * mib);
  // Written once in full, so reads find data and writes pay for no first allocation.
  for (const image of ['fio', 'qemu']) {
    await execFile('rbd', ['-c', ceph.client.conf, 'bench', '--io-type', 'write', '--io-size', '4M', '--io-threads', '4', '--io-pattern', 'seq', '--io-total', `${imageMiB}M`, `${ceph.pool}/${image}`], { timeout: 600_000 });
  }
  const rows: string[][] = [];
  let direct: Rate = { iops: 0, mibs: 0 };
  for (const job of jobs) {
    direct = await fio(ceph, 'fio', job);
    const throughQemu = await qemuImgBench(ceph, 'qemu', job, Math.max(job.depth * 4, Math.round(direct.iops * seconds)));
    const big = job.blockBytes >= mib;
    rows.push([job.name, fmt(direct, big), fmt(throughQemu, big), ratio(big ? throughQemu.mibs : throughQemu.iops, big ? direct.mibs : direct.iops)]);
  }
  // Against fio's 1M qd1 writes, the last job above.
  const guest = await guestWrites(ceph, temp.path, 'guest');
  rows.push(['1M sequential write, qd1: test guest (TCG) vs fio', fmt(direct, true), fmt(guest, true), ratio(guest.mibs, direct.mibs)]);
  console.log(table(['job', 'fio rbd engine', 'through QEMU', 'QEMU / fio'], rows));
});

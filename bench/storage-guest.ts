/**
 * The storage server through a guest: the test guest's iobench (guest/vmferry-guest.c) runs issue 20's four
 * workloads with O_DIRECT on a shared disk that QEMU's own NBD client reaches, once served by vmferry's storage
 * server and once by qemu-storage-daemon, the same preallocated file behind both, the one that goes first
 * alternating from round to round. Prints IOPS, MiB/s and each server's CPU seconds per GiB (each server in a
 * process of its own, its CPU time taken between the guest's start and end lines of each job), with the ratios
 * to qemu-storage-daemon. The guest runs under the host's accelerator as vmferry
 * chooses it (TCG here, where the emulated guest is the bottleneck, so the ratios say more than the figures).
 *
 *   node --import tsx bench/storage-guest.ts [--seconds 5] [--size-mib 256] [--rounds 1] [--jobs 1M,randread]
 *     [--server-node-args='--trace-gc'] [--server-output FILE]
 *
 * --jobs runs only the jobs whose names contain one of its words; --server-node-args (split at spaces) go to the
 * node of vmferry's server, whose output goes to --server-output (to profile it under one job: issue 20).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { reportLogOf, testGuestSpec } from '../src/guest/test-guest.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import type { DiskSpec } from '../src/qemu/spec.ts';
import { pollUntil } from '../src/util/poll.ts';
import { printRound, qsd, selectJobs, vmferryProcess, withServedFile, type JobResult, type ResultRow, type Server } from './lib/nbd-servers.ts';

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '5' },
    'size-mib': { type: 'string', default: '256' },
    rounds: { type: 'string', default: '1' },
    jobs: { type: 'string' },
    'server-node-args': { type: 'string', default: '' },
    'server-output': { type: 'string' },
  },
});
const seconds = Number(values.seconds);
const sizeMiB = Number(values['size-mib']);
const rounds = Number(values.rounds);
for (const [name, value] of [['--seconds', seconds], ['--size-mib', sizeMiB], ['--rounds', rounds]] as const) {
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive whole number (got ${String(value)})`);
}

const selectedJobs = selectJobs(values.jobs);
const guestJobs = selectedJobs.map((job) => `${job.rw}:${job.blockKiB}:${job.iodepth}`);

const resultLine = /^IOBENCH (\S+) ios=(\d+) bytes=(\d+) usec=(\d+)$/;

/** Boots the guest on `server`'s export and follows its report: each job's figures and the server's CPU across it. */
async function runGuest(server: Server, dir: string, round: number): Promise<Map<string, JobResult>> {
  const url = new URL(server.uri);
  const disks: DiskSpec[] = [{ id: 'shared0', source: { kind: 'nbd', server: { type: 'inet', host: url.hostname, port: Number(url.port) }, export: url.pathname.slice(1) } }];
  const name = `iobench${round}${server.name === 'qemu-storage-daemon' ? 'q' : 'v'}`;
  const spec = testGuestSpec(name, disks, dir, { mode: 'iobench', spanMiB: sizeMiB, ioJobs: guestJobs, ioSeconds: seconds });
  const vm = await QemuProcess.start(spec, { runDir: join(dir, `run-${name}`) });
  const results = new Map<string, JobResult>();
  const cpuAtStart = new Map<string, number>();
  try {
    await pollUntil(
      async () => {
        const lines = (await readFile(reportLogOf(spec), 'utf8').catch(() => '')).split('\n').map((line) => line.replace(/\r$/, ''));
        for (const line of lines) {
          const error = line.startsWith('GUEST-ERROR') ? line : undefined;
          if (error) throw new Error(`the guest on ${server.name}: ${error}`);
          const started = line.startsWith('IOBENCH-START ') ? line.slice('IOBENCH-START '.length) : undefined;
          if (started && !cpuAtStart.has(started)) cpuAtStart.set(started, await server.cpuSeconds());
          const done = resultLine.exec(line);
          if (done && !results.has(done[1] as string)) {
            const [job, ios, bytes, usec] = [done[1] as string, Number(done[2]), Number(done[3]), Number(done[4])];
            const cpu = (await server.cpuSeconds()) - (cpuAtStart.get(job) ?? Number.NaN);
            results.set(job, { iops: ios / (usec / 1e6), mibs: bytes / 1024 / 1024 / (usec / 1e6), cpuPerGiB: cpu / (bytes / 1024 ** 3) });
          }
        }
        return lines.includes('IOBENCH-DONE') ? true : undefined;
      },
      // Polled often: each job's CPU figure is taken when its line is seen.
      { timeoutMs: guestJobs.length * (seconds + 30) * 1000 + 120_000, intervalMs: 50, timeoutMessage: () => `the guest on ${server.name} did not finish its jobs (done: ${[...results.keys()].join(', ') || 'none'})` },
    );
  } finally {
    await vm.kill();
    await vm.cleanup();
  }
  return results;
}

await withServedFile('vmferry-bench-guest-', sizeMiB, async ({ dir, file, servers }) => {
  servers.push(await qsd(file, undefined), await vmferryProcess(dir, file, sizeMiB, values['server-node-args'].split(' ').filter(Boolean), values['server-output']));
  console.log(`the test guest's iobench on a shared disk (QEMU's NBD client, loopback TCP), ${seconds} s per job, ${sizeMiB} MiB`);
  for (let round = 1; round <= rounds; round++) {
    const byServer = new Map<string, Map<string, JobResult>>();
    // Which server goes first alternates, so the first boot of a round (colder caches) is no one's handicap.
    for (const server of round % 2 === 1 ? servers : [...servers].reverse()) byServer.set(server.name, await runGuest(server, dir, round));
    const rows: ResultRow[] = [];
    for (const [index, job] of selectedJobs.entries()) {
      const guestJob = guestJobs[index] as string;
      const qsdResult = byServer.get('qemu-storage-daemon')?.get(guestJob);
      for (const server of servers) {
        const result = byServer.get(server.name)?.get(guestJob);
        if (!result) throw new Error(`no result for ${job.name} on ${server.name}`);
        rows.push({ job: job.name, server: server.name, result, qsd: qsdResult });
      }
    }
    printRound(round, rounds, rows);
  }
});

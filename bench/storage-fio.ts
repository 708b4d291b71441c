/**
 * Storage server throughput: fio's nbd engine against vmferry storage,
 * qemu-storage-daemon (file export) and nbdkit (file plugin), each serving the
 * same preallocated file, in one run. All three run side by side and each job
 * goes to each server in turn (job after job, not server after server), so a
 * load that comes and goes on the machine hits all of them alike. Prints IOPS,
 * MiB/s, the ratio to qemu-storage-daemon, and the server process's CPU time
 * (user + system, all its threads) per GiB moved. With --tls every server requires TLS with client
 * certificates (a throwaway CA; fio's libnbd presents an agent's certificate,
 * and runs as user nobody for that: see asClient).
 *
 *   node --import tsx bench/storage-fio.ts [--seconds 10] [--size-mib 1024] [--tls] [--rounds 1] [--jobs 1M,randread]
 *
 * --jobs runs only the jobs whose names contain one of its words.
 */
import { execFile as execFileCallback } from 'node:child_process';
import { parseArgs, promisify } from 'node:util';
import { asClient, makePki, nbdkit, printRound, qsd, selectJobs, vmferry, withServedFile, type JobResult, type Pki, type StorageJob, type ResultRow, type Server } from './lib/nbd-servers.ts';

const execFile = promisify(execFileCallback);
const { values } = parseArgs({
  options: { seconds: { type: 'string', default: '10' }, 'size-mib': { type: 'string', default: '1024' }, tls: { type: 'boolean', default: false }, rounds: { type: 'string', default: '1' }, jobs: { type: 'string' } },
});
const jobs = selectJobs(values.jobs);
const seconds = Number(values.seconds);
const sizeMiB = Number(values['size-mib']);
const rounds = Number(values.rounds);
for (const [name, value] of [['--seconds', seconds], ['--size-mib', sizeMiB], ['--rounds', rounds]] as const) {
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive whole number (got ${String(value)})`);
}

async function runFio(server: Server, job: StorageJob, pki: Pki | undefined, runSeconds = seconds): Promise<JobResult> {
  const uri = server.uri;
  const fioArgs = [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.blockKiB}k`, `--iodepth=${job.iodepth}`,
    `--size=${sizeMiB}M`, '--time_based', `--runtime=${runSeconds}`, '--output-format=json',
  ];
  const cpuBefore = await server.cpuSeconds();
  const { stdout } = await execFile(...asClient('fio', fioArgs, pki), { maxBuffer: 16 * 1024 * 1024 });
  const cpu = (await server.cpuSeconds()) - cpuBefore;
  // fio's nbd engine prints a line of its own before the JSON.
  type Side = { iops: number; bw_bytes: number; io_bytes: number };
  const result = JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: { read: Side; write: Side }[] };
  const stats = job.rw.includes('write') ? result.jobs[0]?.write : result.jobs[0]?.read;
  if (!stats || stats.io_bytes === 0) throw new Error(`fio moved no data with ${server.name} (${job.name})`);
  return { iops: stats.iops, mibs: stats.bw_bytes / 1024 / 1024, cpuPerGiB: cpu / (stats.io_bytes / 1024 ** 3) };
}

await withServedFile('vmferry-bench-', sizeMiB, async ({ dir, file, servers }) => {
  const pki = values.tls ? await makePki(dir) : undefined;
  for (const start of [() => qsd(file, pki), () => nbdkit(file, pki), () => vmferry(dir, file, sizeMiB, pki)]) servers.push(await start());
  // One second of every job on every server first, not counted: vmferry's JIT compiles its hot path in it.
  for (const job of jobs) for (const server of servers) await runFio(server, job, pki, 1);
  console.log(`fio nbd engine, ${seconds} s per job, ${sizeMiB} MiB file, loopback TCP${pki ? ', TLS with client certificates on every server' : ''}`);
  for (let round = 1; round <= rounds; round++) {
    const rows: ResultRow[] = [];
    for (const job of jobs) {
      const results = new Map<string, JobResult>();
      for (const server of servers) results.set(server.name, await runFio(server, job, pki));
      const qsdResult = results.get('qemu-storage-daemon');
      for (const [server, result] of results) rows.push({ job: job.name, server, result, qsd: qsdResult });
    }
    printRound(round, rounds, rows);
  }
});

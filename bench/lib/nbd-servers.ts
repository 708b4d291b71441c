/**
 * The three NBD servers the storage benchmarks compare, each serving one preallocated file: vmferry's storage
 * server (in this process), qemu-storage-daemon and nbdkit's file plugin, with each one's CPU time so far.
 * With a PKI every one requires TLS with client certificates.
 */
import { execFile as execFileCallback, spawn, type ChildProcess } from 'node:child_process';
import { openSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { table } from '../../src/cli/render.ts';
import { initCa, issueCertificate } from '../../src/security/pki.ts';
import { loadTlsIdentity } from '../../src/security/tls-files.ts';
import { StorageServer } from '../../src/storage/server.ts';
import { findFreePort } from '../../src/util/ports.ts';

const execFile = promisify(execFileCallback);

export interface Pki {
  /** The servers' identity directory (its layout is also QEMU's and nbdkit's). */
  server: string;
  /** A home whose .pki/libnbd holds the client's CA, certificate and key. */
  clientHome: string;
}

/** The export's URI: under TLS when there is a PKI. */
export function exportUri(port: number, exportName: string, pki: Pki | undefined): string {
  return `${pki ? 'nbds' : 'nbd'}://127.0.0.1:${port}/${exportName}`;
}

/**
 * A libnbd client's command line. Under TLS it runs as nobody with the client
 * home: fio's libnbd refuses certificates named in the URI (they are local
 * files, which nbd_connect_uri allows only when asked), and as root it would
 * read them from /etc/pki/libnbd, which is the host's, not the benchmark's.
 */
export function asClient(command: string, args: string[], pki: Pki | undefined): [string, string[]] {
  return pki ? ['setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'env', `HOME=${pki.clientHome}`, command, ...args]] : [command, args];
}

/** A throwaway CA, the servers' identity, and an agent's for the client, readable by nobody. */
export async function makePki(dir: string): Promise<Pki> {
  const pkiDir = join(dir, 'pki');
  await initCa(pkiDir);
  const server = (await issueCertificate(pkiDir, { role: 'storage', id: 'storage' })).dir;
  const client = (await issueCertificate(pkiDir, { role: 'agent', id: 'fio' })).dir;
  const clientHome = join(dir, 'client-home');
  const libnbdDir = join(clientHome, '.pki', 'libnbd');
  await mkdir(libnbdDir, { recursive: true, mode: 0o755 });
  for (const name of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) {
    await copyFile(join(client, name), join(libnbdDir, name));
    await chmod(join(libnbdDir, name), 0o644);
  }
  // mkdtemp made the benchmark's directory 0700: let the client through to its home.
  await chmod(dir, 0o711);
  return { server, clientHome };
}

/** The four workloads of issue 20, as fio's nbd engine and the test guest's iobench both run them. */
export const storageJobs = [
  { name: '4k randread qd32', rw: 'randread', blockKiB: 4, iodepth: 32 },
  { name: '4k randwrite qd32', rw: 'randwrite', blockKiB: 4, iodepth: 32 },
  { name: '1M read qd8', rw: 'read', blockKiB: 1024, iodepth: 8 },
  { name: '1M write qd8', rw: 'write', blockKiB: 1024, iodepth: 8 },
] as const;

export type StorageJob = (typeof storageJobs)[number];

/** The jobs whose names contain one of the comma-separated words of `--jobs` (all without it). */
export function selectJobs(words: string | undefined): readonly StorageJob[] {
  if (words === undefined) return storageJobs;
  const selected = storageJobs.filter((job) => words.split(',').some((word) => job.name.includes(word)));
  if (selected.length === 0) throw new Error(`--jobs ${words} names none of: ${storageJobs.map((job) => job.name).join(', ')}`);
  return selected;
}

/** One job's figures on one server. */
export interface JobResult {
  iops: number;
  mibs: number;
  /** The server's CPU seconds per GiB of data moved. */
  cpuPerGiB: number;
}

/** One server's figures for one job, beside qemu-storage-daemon's for the same job. */
export interface ResultRow {
  job: string;
  server: string;
  result: JobResult;
  qsd: JobResult | undefined;
}

/** One round's table: a row per job and server, with the ratios to qemu-storage-daemon's figures for that job. */
export function resultTable(rows: readonly ResultRow[]): string {
  const cells = rows.map(({ job, server, result: r, qsd }) => [
    job, server, String(Math.round(r.iops)), r.mibs.toFixed(1), r.cpuPerGiB.toFixed(2),
    qsd ? (r.iops / qsd.iops).toFixed(2) : '-', qsd ? (r.cpuPerGiB / qsd.cpuPerGiB).toFixed(2) : '-',
  ]);
  return table(['job', 'server', 'IOPS', 'MiB/s', 'CPU s/GiB', 'speed vs qsd', 'CPU/GiB vs qsd'], cells);
}

/** Prints one round's table, headed by its number when there are several. */
export function printRound(round: number, rounds: number, rows: readonly ResultRow[]): void {
  if (rounds > 1) console.log(`round ${round} of ${rounds}`);
  console.log(resultTable(rows));
}

/**
 * Runs `body` in a scratch directory holding a preallocated file of `sizeMiB` for the servers to serve; every server
 * `body` adds to `servers` is stopped and the directory removed afterwards, whatever happened.
 */
export async function withServedFile(prefix: string, sizeMiB: number, body: (scratch: { dir: string; file: string; servers: Server[] }) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  try {
    const file = await preallocatedFile(join(dir, 'bench.raw'), sizeMiB);
    const servers: Server[] = [];
    try {
      await body({ dir, file, servers });
    } finally {
      for (const server of servers) await server.stop();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface Server {
  name: string;
  uri: string;
  /** CPU seconds (user + system, every thread) the server's process has used so far. */
  cpuSeconds(): Promise<number>;
  stop(): Promise<void>;
}

/** Clock ticks per second of /proc/PID/stat's times (sysconf(_SC_CLK_TCK)). */
const clockTicks = Number((await execFile('getconf', ['CLK_TCK'])).stdout.trim());

/** utime + stime of a process, from /proc/PID/stat (fields 14 and 15, counted after the command name's closing parenthesis). */
export async function processCpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / clockTicks;
}

async function waitForNbd(uri: string, pki: Pki | undefined): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (await execFile(...asClient('nbdinfo', ['--size', uri], pki)).then(() => true, () => false)) return;
    await sleep(100);
  }
  throw new Error(`no NBD server at ${uri}`);
}

/** `outputFile`, when given, takes the process's stdout and stderr. */
async function child(name: string, command: string, args: string[], uri: string, pki: Pki | undefined, outputFile?: string): Promise<Server> {
  const output = outputFile === undefined ? 'ignore' : openSync(outputFile, 'w');
  const process: ChildProcess = spawn(command, args, { stdio: ['ignore', output, output] });
  await waitForNbd(uri, pki);
  const pid = process.pid;
  if (pid === undefined) throw new Error(`${command} did not start`);
  return {
    name,
    uri,
    cpuSeconds: () => processCpuSeconds(pid),
    stop: async () => {
      const exited = new Promise((resolve) => process.once('exit', resolve));
      process.kill('SIGTERM');
      await exited;
    },
  };
}

/** vmferry's storage server in this process, serving a copy of `file` as volume `bench` (on `port`, or any free one). */
export async function vmferry(dir: string, file: string, sizeMiB: number, pki: Pki | undefined, port = 0): Promise<Server> {
  const tls = pki ? loadTlsIdentity({ pkiDir: pki.server }, 'server') : undefined;
  const server = await StorageServer.start({ dataDir: join(dir, 'vmferry'), logger: pino({ level: 'silent' }), nbd: { host: '127.0.0.1', port }, ...(tls ? { tls } : {}) });
  await server.volumes.create('bench', sizeMiB * 1024 * 1024);
  // Serve the same preallocated file as the peers.
  const copy = join(dir, 'vmferry', 'volumes', 'bench.raw');
  await execFile('cp', ['--sparse=never', file, copy]);
  // Written back now, not during the first job.
  await execFile('sync', [copy]);
  // The server runs in this process, which otherwise only waits for fio while a job runs.
  const cpuSeconds = (): Promise<number> => {
    const { user, system } = process.cpuUsage();
    return Promise.resolve((user + system) / 1e6);
  };
  return { name: 'vmferry storage', uri: exportUri(server.addresses.nbdPort as number, 'bench', pki), cpuSeconds, stop: () => server.close() };
}

/**
 * The same in a process of its own (storage-server-process.ts), for a benchmark whose own process does more than
 * wait: its CPU time is then the server's alone. `nodeArgs` go to that node (a profiler's: `--cpu-prof`,
 * `--perf-basic-prof`, `--trace-gc`), and its output to `outputFile`.
 */
export async function vmferryProcess(dir: string, file: string, sizeMiB: number, nodeArgs: readonly string[] = [], outputFile?: string): Promise<Server> {
  const port = await findFreePort('127.0.0.1');
  const script = join(import.meta.dirname, 'storage-server-process.ts');
  const args = [...nodeArgs, '--import', 'tsx', script, dir, file, String(sizeMiB), String(port)];
  return child('vmferry storage', process.execPath, args, exportUri(port, 'bench', undefined), undefined, outputFile);
}

export async function qsd(file: string, pki: Pki | undefined): Promise<Server> {
  const port = await findFreePort('127.0.0.1');
  return child(
    'qemu-storage-daemon',
    'qemu-storage-daemon',
    [
      '--blockdev', `driver=file,node-name=file0,filename=${file},cache.direct=off,aio=threads`,
      ...(pki ? ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${pki.server},verify-peer=on`] : []),
      '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}${pki ? ',tls-creds=tls0' : ''}`,
      '--export', 'type=nbd,id=exp0,node-name=file0,name=bench,writable=on',
    ],
    exportUri(port, 'bench', pki),
    pki,
  );
}

export async function nbdkit(file: string, pki: Pki | undefined): Promise<Server> {
  const port = await findFreePort('127.0.0.1');
  const tls = pki ? ['--tls=require', `--tls-certificates=${pki.server}`, '--tls-verify-peer'] : [];
  return child('nbdkit', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...tls, 'file', file], exportUri(port, '', pki), pki);
}

/** A file of `sizeMiB` written with zeros (allocated, not sparse) and synced, for every server to serve. */
export async function preallocatedFile(path: string, sizeMiB: number): Promise<string> {
  await execFile('fallocate', ['-l', `${sizeMiB}M`, path]);
  await execFile('dd', ['if=/dev/zero', `of=${path}`, 'bs=1M', `count=${sizeMiB}`, 'conv=notrunc,fsync']);
  return path;
}

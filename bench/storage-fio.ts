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
 *   node --import tsx bench/storage-fio.ts [--seconds 10] [--size-mib 1024] [--tls] [--rounds 1]
 */
import { execFile as execFileCallback, spawn, type ChildProcess } from 'node:child_process';
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { initCa, issueCertificate } from '../src/security/pki.ts';
import { loadTlsIdentity } from '../src/security/tls-files.ts';
import { StorageServer } from '../src/storage/server.ts';
import { findFreePort } from '../src/util/ports.ts';
import { table } from '../src/cli/render.ts';

const execFile = promisify(execFileCallback);
const { values } = parseArgs({ options: { seconds: { type: 'string', default: '10' }, 'size-mib': { type: 'string', default: '1024' }, tls: { type: 'boolean', default: false }, rounds: { type: 'string', default: '1' } } });
const seconds = Number(values.seconds);
const sizeMiB = Number(values['size-mib']);
const rounds = Number(values.rounds);
for (const [name, value] of [['--seconds', seconds], ['--size-mib', sizeMiB], ['--rounds', rounds]] as const) {
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive whole number (got ${String(value)})`);
}

interface Pki {
  /** The servers' identity directory (its layout is also QEMU's and nbdkit's). */
  server: string;
  /** A home whose .pki/libnbd holds the client's CA, certificate and key. */
  clientHome: string;
}

/** The export's URI: under TLS when there is a PKI. */
function exportUri(port: number, exportName: string, pki: Pki | undefined): string {
  return `${pki ? 'nbds' : 'nbd'}://127.0.0.1:${port}/${exportName}`;
}

/**
 * A libnbd client's command line. Under TLS it runs as nobody with the client
 * home: fio's libnbd refuses certificates named in the URI (they are local
 * files, which nbd_connect_uri allows only when asked), and as root it would
 * read them from /etc/pki/libnbd, which is the host's, not the benchmark's.
 */
function asClient(command: string, args: string[], pki: Pki | undefined): [string, string[]] {
  return pki ? ['setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'env', `HOME=${pki.clientHome}`, command, ...args]] : [command, args];
}

/** A throwaway CA, the servers' identity, and an agent's for the client, readable by nobody. */
async function makePki(dir: string): Promise<Pki> {
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

const jobs = [
  { name: '4k randread qd32', rw: 'randread', bs: '4k', iodepth: 32 },
  { name: '4k randwrite qd32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { name: '1M read qd8', rw: 'read', bs: '1M', iodepth: 8 },
  { name: '1M write qd8', rw: 'write', bs: '1M', iodepth: 8 },
] as const;

interface Server {
  name: string;
  uri: string;
  /** CPU seconds (user + system, every thread) the server's process has used so far. */
  cpuSeconds(): Promise<number>;
  stop(): Promise<void>;
}

/** Clock ticks per second of /proc/PID/stat's times (sysconf(_SC_CLK_TCK)). */
const clockTicks = Number((await execFile('getconf', ['CLK_TCK'])).stdout.trim());

/** utime + stime of a process, from /proc/PID/stat (fields 14 and 15, counted after the command name's closing parenthesis). */
async function processCpuSeconds(pid: number): Promise<number> {
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

async function child(name: string, command: string, args: string[], uri: string, pki: Pki | undefined): Promise<Server> {
  const process: ChildProcess = spawn(command, args, { stdio: 'ignore' });
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

async function vmferry(dir: string, file: string, pki: Pki | undefined): Promise<Server> {
  const tls = pki ? loadTlsIdentity({ pkiDir: pki.server }, 'server') : undefined;
  const server = await StorageServer.start({ dataDir: join(dir, 'vmferry'), logger: pino({ level: 'silent' }), nbd: { host: '127.0.0.1', port: 0 }, ...(tls ? { tls } : {}) });
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

async function qsd(file: string, pki: Pki | undefined): Promise<Server> {
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

async function nbdkit(file: string, pki: Pki | undefined): Promise<Server> {
  const port = await findFreePort('127.0.0.1');
  const tls = pki ? ['--tls=require', `--tls-certificates=${pki.server}`, '--tls-verify-peer'] : [];
  return child('nbdkit', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...tls, 'file', file], exportUri(port, '', pki), pki);
}

interface JobResult {
  iops: number;
  mibs: number;
  /** The server's CPU seconds per GiB of data moved. */
  cpuPerGiB: number;
}

async function runFio(server: Server, job: (typeof jobs)[number], pki: Pki | undefined, runSeconds = seconds): Promise<JobResult> {
  const uri = server.uri;
  const fioArgs = [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`,
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

const dir = await mkdtemp(join(tmpdir(), 'vmferry-bench-'));
try {
  const file = join(dir, 'bench.raw');
  await execFile('fallocate', ['-l', `${sizeMiB}M`, file]);
  await execFile('dd', ['if=/dev/zero', `of=${file}`, 'bs=1M', `count=${sizeMiB}`, 'conv=notrunc,fsync']);
  const pki = values.tls ? await makePki(dir) : undefined;
  const servers: Server[] = [];
  try {
    for (const start of [() => qsd(file, pki), () => nbdkit(file, pki), () => vmferry(dir, file, pki)]) servers.push(await start());
    // One second of every job on every server first, not counted: vmferry's JIT compiles its hot path in it.
    for (const job of jobs) for (const server of servers) await runFio(server, job, pki, 1);
    console.log(`fio nbd engine, ${seconds} s per job, ${sizeMiB} MiB file, loopback TCP${pki ? ', TLS with client certificates on every server' : ''}`);
    for (let round = 1; round <= rounds; round++) {
      const rows: string[][] = [];
      for (const job of jobs) {
        const results = new Map<string, JobResult>();
        for (const server of servers) results.set(server.name, await runFio(server, job, pki));
        const base = results.get('qemu-storage-daemon');
        for (const [server, r] of results) {
          rows.push([job.name, server, String(Math.round(r.iops)), r.mibs.toFixed(1), r.cpuPerGiB.toFixed(2), base ? (r.iops / base.iops).toFixed(2) : '-', base ? (r.cpuPerGiB / base.cpuPerGiB).toFixed(2) : '-']);
        }
      }
      if (rounds > 1) console.log(`round ${round} of ${rounds}`);
      console.log(table(['job', 'server', 'IOPS', 'MiB/s', 'CPU s/GiB', 'speed vs qsd', 'CPU/GiB vs qsd'], rows));
    }
  } finally {
    for (const server of servers) await server.stop();
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}

/**
 * Storage server throughput: fio's nbd engine against vmferry storage,
 * qemu-storage-daemon (file export) and nbdkit (file plugin), each serving the
 * same preallocated file in turn, in one run. Prints IOPS, MiB/s and the ratio
 * to qemu-storage-daemon. With --tls every server requires TLS with client
 * certificates (a throwaway CA; fio's libnbd presents an agent's certificate,
 * and runs as user nobody for that: see asClient).
 *
 *   node --import tsx bench/storage-fio.ts [--seconds 10] [--size-mib 1024] [--tls]
 */
import { execFile as execFileCallback, spawn, type ChildProcess } from 'node:child_process';
import { chmod, copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
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
const { values } = parseArgs({ options: { seconds: { type: 'string', default: '10' }, 'size-mib': { type: 'string', default: '1024' }, tls: { type: 'boolean', default: false } } });
const seconds = Number(values.seconds);
const sizeMiB = Number(values['size-mib']);

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
  stop(): Promise<void>;
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
  return {
    name,
    uri,
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
  await execFile('cp', ['--sparse=never', file, join(dir, 'vmferry', 'volumes', 'bench.raw')]);
  return { name: 'vmferry storage', uri: exportUri(server.addresses.nbdPort as number, 'bench', pki), stop: () => server.close() };
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

async function runFio(uri: string, job: (typeof jobs)[number], pki: Pki | undefined): Promise<{ iops: number; mibs: number }> {
  const fioArgs = [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`,
    `--size=${sizeMiB}M`, '--time_based', `--runtime=${seconds}`, '--output-format=json',
  ];
  const { stdout } = await execFile(...asClient('fio', fioArgs, pki), { maxBuffer: 16 * 1024 * 1024 });
  // fio's nbd engine prints a line of its own before the JSON.
  const result = JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: { read: { iops: number; bw_bytes: number }; write: { iops: number; bw_bytes: number } }[] };
  const stats = job.rw.includes('write') ? result.jobs[0]?.write : result.jobs[0]?.read;
  return { iops: stats?.iops ?? 0, mibs: (stats?.bw_bytes ?? 0) / 1024 / 1024 };
}

const dir = await mkdtemp(join(tmpdir(), 'vmferry-bench-'));
try {
  const file = join(dir, 'bench.raw');
  await execFile('fallocate', ['-l', `${sizeMiB}M`, file]);
  await execFile('dd', ['if=/dev/zero', `of=${file}`, 'bs=1M', `count=${sizeMiB}`, 'conv=notrunc']);
  const pki = values.tls ? await makePki(dir) : undefined;
  const results = new Map<string, Map<string, { iops: number; mibs: number }>>();
  for (const start of [() => qsd(file, pki), () => nbdkit(file, pki), () => vmferry(dir, file, pki)]) {
    const server = await start();
    const perJob = new Map<string, { iops: number; mibs: number }>();
    try {
      for (const job of jobs) perJob.set(job.name, await runFio(server.uri, job, pki));
    } finally {
      await server.stop();
    }
    results.set(server.name, perJob);
  }
  const baseline = results.get('qemu-storage-daemon');
  const rows = jobs.flatMap((job) =>
    [...results].map(([server, perJob]) => {
      const r = perJob.get(job.name) ?? { iops: 0, mibs: 0 };
      const base = baseline?.get(job.name)?.iops ?? 0;
      return [job.name, server, Math.round(r.iops), r.mibs.toFixed(1), base ? (r.iops / base).toFixed(2) : '-'];
    }),
  );
  console.log(`fio nbd engine, ${seconds} s per job, ${sizeMiB} MiB file, loopback TCP${pki ? ', TLS with client certificates on every server' : ''}`);
  console.log(table(['job', 'server', 'IOPS', 'MiB/s', 'vs qemu-storage-daemon'], rows));
} finally {
  await rm(dir, { recursive: true, force: true });
}

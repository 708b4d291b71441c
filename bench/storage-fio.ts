/**
 * Storage server throughput: fio's nbd engine against vmferry storage,
 * qemu-storage-daemon (file export) and nbdkit (file plugin), each serving the
 * same preallocated file in turn, in one run. Prints IOPS, MiB/s and the ratio
 * to qemu-storage-daemon. With --tls every server requires TLS with client
 * certificates (a throwaway CA; fio's libnbd presents an agent's certificate).
 *
 *   node --import tsx bench/storage-fio.ts [--seconds 10] [--size-mib 1024] [--tls]
 */
import { execFile as execFileCallback, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
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

/** Identity directories (their layout is also QEMU's, nbdkit's and libnbd's): the servers', and the client's fio presents. */
interface Pki {
  server: string;
  client: string;
}

/** The export's URI, under TLS with the client's certificates when there is a PKI. */
function exportUri(port: number, exportName: string, pki: Pki | undefined): string {
  return pki ? `nbds://127.0.0.1:${port}/${exportName}?tls-certificates=${pki.client}` : `nbd://127.0.0.1:${port}/${exportName}`;
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

async function waitForNbd(uri: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (await execFile('nbdinfo', ['--size', uri]).then(() => true, () => false)) return;
    await sleep(100);
  }
  throw new Error(`no NBD server at ${uri}`);
}

async function child(name: string, command: string, args: string[], uri: string): Promise<Server> {
  const process: ChildProcess = spawn(command, args, { stdio: 'ignore' });
  await waitForNbd(uri);
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
  );
}

async function nbdkit(file: string, pki: Pki | undefined): Promise<Server> {
  const port = await findFreePort('127.0.0.1');
  const tls = pki ? ['--tls=require', `--tls-certificates=${pki.server}`, '--tls-verify-peer'] : [];
  return child('nbdkit', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...tls, 'file', file], exportUri(port, '', pki));
}

async function runFio(uri: string, job: (typeof jobs)[number]): Promise<{ iops: number; mibs: number }> {
  const { stdout } = await execFile('fio', [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`,
    `--size=${sizeMiB}M`, '--time_based', `--runtime=${seconds}`, '--output-format=json',
  ], { maxBuffer: 16 * 1024 * 1024 });
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
  let pki: Pki | undefined;
  if (values.tls) {
    const pkiDir = join(dir, 'pki');
    await initCa(pkiDir);
    pki = { server: (await issueCertificate(pkiDir, { role: 'storage', id: 'storage' })).dir, client: (await issueCertificate(pkiDir, { role: 'agent', id: 'fio' })).dir };
  }
  const results = new Map<string, Map<string, { iops: number; mibs: number }>>();
  for (const start of [() => qsd(file, pki), () => nbdkit(file, pki), () => vmferry(dir, file, pki)]) {
    const server = await start();
    const perJob = new Map<string, { iops: number; mibs: number }>();
    try {
      for (const job of jobs) perJob.set(job.name, await runFio(server.uri, job));
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

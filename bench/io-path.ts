/**
 * The short I/O path: guest write throughput and host CPU seconds per GiB
 * written, to a volume on the vmferry storage server reached two ways:
 *
 *   user-space NBD   QEMU's own NBD client (-blockdev driver=nbd) → server;
 *                    no kernel block device, no host file system on the way
 *   kernel (FUSE)    nbdfuse mounts the same export as a file; QEMU opens that
 *                    file (driver=file, raw, O_DIRECT, aio=threads), so every
 *                    request crosses the kernel's FUSE layer and nbdfuse's
 *                    user-space NBD client before reaching the same server
 *
 * (A kernel NBD device, nbd-client + /dev/nbdX, would be the classic kernel
 * path, but this machine's kernel has no nbd module.)
 *
 * The guest is vmferry's test guest writing 1 MiB O_DIRECT blocks as fast as
 * it can to the one disk (bulk_mib_s above 1000 means no pause). Throughput is
 * QEMU's own count of bytes the guest wrote (query-blockstats wr_bytes) over
 * the measuring window; CPU is read from /proc for QEMU (split into the vCPU
 * thread, which emulates the guest under TCG, and everything else: I/O), the
 * storage server (its own process here) and nbdfuse. Kernel work done in other
 * threads (kworkers) is not counted. Paths alternate, each on a fresh boot.
 *
 *   node --import tsx bench/io-path.ts [--small] [--seconds 15] [--rounds 3]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, openSync, closeSync } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { table } from '../src/cli/render.ts';
import { testGuestSpec, reportLogOf, waitForAcks } from '../src/guest/test-guest.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import type { DiskSpec } from '../src/qemu/spec.ts';
import type { Cleanup } from '../test/support/cleanup.ts';
import { makeTempDir } from '../test/support/temp.ts';
import { cpuSecondsOf, cpuTimesOf, execFile, freePort, hostSync, isMain, machineLine, mib, median, ratio, withCleanup } from './lib/common.ts';

type PathName = 'user-space NBD' | 'kernel (nbdfuse)';

interface PathResult {
  path: PathName;
  mibs: number;
  gib: number;
  qemuVcpu: number;
  qemuIo: number;
  server: number;
  /** Of which in the kernel (system time). */
  serverSystem: number;
  fuse: number;
}

const repoRoot = resolve(import.meta.dirname, '..');

function waitExit(child: ChildProcess): Promise<void> {
  return new Promise((done) => {
    if (child.exitCode !== null || child.signalCode !== null) done();
    else child.once('exit', () => done());
  });
}

async function stopChild(child: ChildProcess, timeoutMs = 10_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const exited = waitExit(child);
  if ((await Promise.race([exited.then(() => true), sleep(timeoutMs).then(() => false)])) === false) {
    child.kill('SIGKILL');
    await exited;
  }
}

/** CPU seconds of a QEMU's vCPU threads (named "CPU n/TCG" with debug-threads=on). */
async function vcpuSeconds(pid: number): Promise<number> {
  let total = 0;
  for (const task of await readdir(`/proc/${pid}/task`).catch(() => [] as string[])) {
    const comm = await readFile(`/proc/${pid}/task/${task}/comm`, 'utf8').catch(() => '');
    if (!/^CPU \d+\/TCG/.test(comm)) continue;
    const fields = (await readFile(`/proc/${pid}/task/${task}/stat`, 'utf8').catch(() => '')).split(') ')[1]?.split(' ') ?? [];
    total += (Number(fields[11]) + Number(fields[12])) / 100;
  }
  return total;
}

async function startServer(dir: string, cleanup: Cleanup): Promise<{ pid: number; nbdPort: number; adminUrl: string }> {
  const nbdPort = await freePort();
  const adminPort = await freePort();
  const log = openSync(join(dir, 'storage.log'), 'a');
  let child: ChildProcess;
  try {
    // Its own process, so its CPU time is its own.
    child = spawn(process.execPath, [join(repoRoot, 'bin/vmferry.js'), 'storage', 'serve', '--data-dir', join(dir, 'storage'),
      '--listen', `127.0.0.1:${nbdPort}`, '--admin', `127.0.0.1:${adminPort}`, '--insecure'], { stdio: ['ignore', log, log] });
  } finally {
    closeSync(log);
  }
  cleanup.add('stop the storage server', () => stopChild(child));
  const adminUrl = `http://127.0.0.1:${adminPort}`;
  for (let i = 0; ; i++) {
    if (await fetch(`${adminUrl}/v1/volumes`).then((r) => r.ok, () => false)) break;
    if (i >= 150 || child.exitCode !== null) throw new Error(`the storage server did not start (see ${join(dir, 'storage.log')})`);
    await sleep(100);
  }
  return { pid: child.pid as number, nbdPort, adminUrl };
}

async function mountFuse(dir: string, uri: string, sizeBytes: number, cleanup: Cleanup): Promise<{ file: string; pid: number }> {
  const mountpoint = join(dir, 'fuse');
  mkdirSync(mountpoint, { recursive: true });
  const child = spawn('nbdfuse', [join(mountpoint, 'io0'), uri], { stdio: ['ignore', 'ignore', 'inherit'] });
  const file = join(mountpoint, 'io0');
  const unmount = async (): Promise<void> => {
    await execFile('umount', [mountpoint]).catch(() => undefined);
    // nbdfuse leaves on its own once unmounted; a signal only if it does not.
    await Promise.race([waitExit(child), sleep(3000)]);
    await stopChild(child);
  };
  try {
    for (let i = 0; ; i++) {
      if ((await stat(file).then((s) => s.size, () => 0)) === sizeBytes) break;
      if (i >= 100 || child.exitCode !== null) throw new Error(`nbdfuse did not mount ${uri}`);
      await sleep(100);
    }
  } catch (err) {
    await unmount();
    throw err;
  }
  cleanup.add('unmount nbdfuse', unmount);
  return { file, pid: child.pid as number };
}

async function writtenBytes(vm: QemuProcess): Promise<number> {
  const stats = await vm.monitor.client.execute<{ qdev?: string; stats: { wr_bytes: number } }[]>('query-blockstats');
  return stats.find((s) => s.qdev?.includes('/io0/'))?.stats.wr_bytes ?? 0;
}

function measurePath(path: PathName, dir: string, server: { pid: number; nbdPort: number }, sizeBytes: number, measureS: number): Promise<PathResult> {
  return withCleanup(async (cleanup) => {
    let disk: DiskSpec;
    let fusePid: number | undefined;
    if (path === 'user-space NBD') {
      disk = { id: 'io0', source: { kind: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: server.nbdPort }, export: 'io0' } };
    } else {
      const fuse = await mountFuse(dir, `nbd://127.0.0.1:${server.nbdPort}/io0`, sizeBytes, cleanup);
      fusePid = fuse.pid;
      disk = { id: 'io0', source: { kind: 'file', path: fuse.file, format: 'raw' } };
    }
    const logs = join(dir, 'logs');
    mkdirSync(logs, { recursive: true });
    const spec = testGuestSpec('io', [disk], logs, { mode: 'workload', spanMiB: 8, bulkMiBs: 4000, bulkDisks: ['io0'], intervalMs: 1000 }, 256);
    await hostSync();
    const vm = await QemuProcess.start(spec, { runDir: join(dir, 'run', path === 'user-space NBD' ? 'nbd' : 'fuse') });
    cleanup.add('stop QEMU', () => vm.kill());
    await waitForAcks([reportLogOf(spec)], ['io0'], { atLeast: 2, timeoutMs: 120_000 });
    await sleep(2000); // bulk writes in full swing
    const sample = async () => ({
      t: performance.now(),
      bytes: await writtenBytes(vm),
      qemu: await cpuSecondsOf(vm.pid),
      vcpu: await vcpuSeconds(vm.pid),
      server: await cpuTimesOf(server.pid),
      fuse: fusePid ? await cpuSecondsOf(fusePid) : 0,
    });
    const before = await sample();
    await sleep(measureS * 1000);
    const after = await sample();
    const gib = (after.bytes - before.bytes) / (1024 * mib);
    const vcpu = after.vcpu - before.vcpu;
    return {
      path,
      mibs: (after.bytes - before.bytes) / mib / ((after.t - before.t) / 1000),
      gib,
      qemuVcpu: vcpu / gib,
      qemuIo: (after.qemu - before.qemu - vcpu) / gib,
      server: (after.server.user + after.server.system - before.server.user - before.server.system) / gib,
      serverSystem: (after.server.system - before.server.system) / gib,
      fuse: (after.fuse - before.fuse) / gib,
    };
  });
}

export async function ioPathBench(options: { small: boolean; seconds: number; rounds: number }): Promise<PathResult[]> {
  const sizeMiB = options.small ? 1024 : 2048;
  console.log(`\n== Short I/O path: guest 1 MiB O_DIRECT writes to a ${sizeMiB} MiB vmferry volume, ${options.seconds} s per run, ${options.rounds} round(s)`);
  console.log(await machineLine());
  const fuseUsable = existsSync('/dev/fuse') && (await execFile('which', ['nbdfuse']).then(() => true, () => false));
  if (!fuseUsable) console.log('nbdfuse or /dev/fuse is missing: only the user-space path runs (apt-get install libnbd-bin fuse3)');
  const results: PathResult[] = [];
  await withCleanup(async (cleanup) => {
    const temp = await makeTempDir('bench-io');
    cleanup.add('remove temp dir', () => temp.remove());
    const server = await startServer(temp.path, cleanup);
    const created = await fetch(`${server.adminUrl}/v1/volumes`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'io0', sizeBytes: sizeMiB * mib }),
    });
    if (!created.ok) throw new Error(`cannot create the volume: ${created.status} ${await created.text()}`);
    // Fully written once, so neither path pays for the server's file system allocating blocks.
    await execFile('dd', ['if=/dev/zero', `of=${join(temp.path, 'storage', 'volumes', 'io0.raw')}`, 'bs=1M', `count=${sizeMiB}`, 'conv=notrunc'], { timeout: 300_000 });
    for (let round = 0; round < options.rounds; round++) {
      const paths: PathName[] = fuseUsable ? (round % 2 === 0 ? ['user-space NBD', 'kernel (nbdfuse)'] : ['kernel (nbdfuse)', 'user-space NBD']) : ['user-space NBD'];
      for (const path of paths) {
        const result = await measurePath(path, temp.path, server, sizeMiB * mib, options.seconds);
        console.log(`  round ${round + 1} ${path}: ${result.mibs.toFixed(0)} MiB/s`);
        results.push(result);
      }
    }
  });
  const byPath = (path: PathName): PathResult[] => results.filter((r) => r.path === path);
  const summary = (['user-space NBD', 'kernel (nbdfuse)'] as PathName[]).filter((p) => byPath(p).length > 0).map((path) => {
    const runs = byPath(path);
    const m = (f: (r: PathResult) => number): number => median(runs.map(f));
    return { path, mibs: m((r) => r.mibs), vcpu: m((r) => r.qemuVcpu), io: m((r) => r.qemuIo), server: m((r) => r.server), serverSystem: m((r) => r.serverSystem), fuse: m((r) => r.fuse) };
  });
  const user = summary.find((s) => s.path === 'user-space NBD');
  console.log(table(
    ['path', 'guest MiB/s', 'QEMU vCPU s/GiB', 'QEMU I/O threads s/GiB', 'server s/GiB (kernel part)', 'nbdfuse s/GiB', 'I/O path s/GiB (no vCPU)', 'throughput ÷ user-space', 'I/O CPU ÷ user-space'],
    summary.map((s) => {
      const ioPath = s.io + s.server + s.fuse;
      const userIo = user ? user.io + user.server + user.fuse : Number.NaN;
      return [s.path, s.mibs.toFixed(0), s.vcpu.toFixed(2), s.io.toFixed(2), `${s.server.toFixed(2)} (${s.serverSystem.toFixed(2)})`, s.fuse.toFixed(2), ioPath.toFixed(2), ratio(s.mibs, user?.mibs ?? 0), ratio(ioPath, userIo)];
    }),
  ));
  console.log('medians over rounds; per-run throughput: ' + results.map((r) => `${r.path} ${r.mibs.toFixed(0)}`).join(', '));
  // Paired within each round (the two runs were back to back): the machine's load moves both, the ratio less.
  const perRound: string[] = [];
  for (let round = 0; round * 2 + 1 < results.length; round++) {
    const pair = results.slice(round * 2, round * 2 + 2);
    const u = pair.find((r) => r.path === 'user-space NBD');
    const k = pair.find((r) => r.path === 'kernel (nbdfuse)');
    if (!u || !k) continue;
    const io = (r: PathResult): number => r.qemuIo + r.server + r.fuse;
    perRound.push(`round ${round + 1}: user-space ÷ kernel throughput ${ratio(u.mibs, k.mibs)}, I/O CPU per GiB kernel ÷ user-space ${ratio(io(k), io(u))}`);
  }
  if (perRound.length) console.log(perRound.join('\n'));
  return results;
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({ options: { small: { type: 'boolean', default: false }, seconds: { type: 'string' }, rounds: { type: 'string' } } });
  const small = values.small ?? false;
  await ioPathBench({ small, seconds: Number(values.seconds ?? (small ? 8 : 15)), rounds: Number(values.rounds ?? (small ? 1 : 3)) });
}

/** Small helpers every benchmark shares: processes, host facts, formatting. */
import { execFile as execFileCallback } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Cleanup } from '../../test/support/cleanup.ts';

export const execFile = promisify(execFileCallback);
export const mib = 1024 * 1024;

/** Flushes the host's dirty page cache: fresh images' write-back otherwise competes with what is measured. */
export async function hostSync(): Promise<void> {
  await execFile('sync', [], { timeout: 120_000 });
}

/** A TCP port free on `host` right now (the kernel picks it). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, host, () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** CPU seconds in user and system mode a process has used so far, from /proc; 0 once it is gone. */
export async function cpuTimesOf(pid: number): Promise<{ user: number; system: number }> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces) start after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name. USER_HZ is 100 on Linux.
    return { user: Number(fields[11]) / 100, system: Number(fields[12]) / 100 };
  } catch {
    return { user: 0, system: 0 };
  }
}

/** CPU seconds (user + system) a process has used so far; 0 once it is gone. */
export async function cpuSecondsOf(pid: number): Promise<number> {
  const { user, system } = await cpuTimesOf(pid);
  return user + system;
}

/** Bytes in 4 KiB pages that are not all zero, in a file. */
export async function nonZeroPageBytes(path: string): Promise<number> {
  const page = 4096;
  const zero = Buffer.alloc(page);
  const chunk = Buffer.alloc(4 * mib);
  const file = await open(path, 'r');
  let nonZero = 0;
  try {
    for (let position = 0; ; position += chunk.length) {
      const { bytesRead } = await file.read(chunk, 0, chunk.length, position);
      if (bytesRead === 0) break;
      for (let offset = 0; offset + page <= bytesRead; offset += page) {
        if (chunk.compare(zero, 0, page, offset, offset + page) !== 0) nonZero += page;
      }
    }
  } finally {
    await file.close();
  }
  return nonZero;
}

/**
 * Guest RAM in use: QEMU dumps the guest's physical memory (pmemsave) to
 * tmpfs, and every page that is not all zeros counts. Those are the pages a
 * pre-copy migration must send in full at least once; zero pages cost QEMU
 * only a few bytes of header each.
 */
export async function guestRamInUse(execute: (command: string, args: Record<string, unknown>) => Promise<unknown>, memoryMiB: number): Promise<number> {
  const path = `/dev/shm/vmferry-bench-ram-${randomBytes(6).toString('hex')}`;
  try {
    await execute('pmemsave', { val: 0, size: memoryMiB * mib, filename: path });
    return await nonZeroPageBytes(path);
  } finally {
    await rm(path, { force: true });
  }
}

export function toMiB(bytes: number): string {
  return (bytes / mib).toFixed(1);
}

export function seconds(ms: number): string {
  return (ms / 1000).toFixed(2);
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  if (sorted.length === 0) return Number.NaN;
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? (sorted[middle] as number) : ((sorted[middle - 1] as number) + (sorted[middle] as number)) / 2;
}

export function ratio(a: number, b: number): string {
  return b > 0 && Number.isFinite(a) ? (a / b).toFixed(2) : '-';
}

/** "✔" or "✘" for an aim, with the aim's text. */
export function aim(met: boolean, text: string): string {
  return `${met ? '✔' : '✘'} ${text}`;
}

/** The machine's load right now, printed with every table: numbers on a shared 2-core host are noisy. */
export async function machineLine(): Promise<string> {
  const load = (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');
  const qemu = (await execFile('qemu-system-x86_64', ['--version'])).stdout.split('\n')[0] ?? '';
  return `${new Date().toISOString()} · ${(await execFile('nproc')).stdout.trim()} cores · load ${load} · ${qemu} · TCG`;
}

/** True when the module at `url` is the script node was started with (run alone, not imported by run-all). */
export function isMain(url: string): boolean {
  return process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(url);
}

const live = new Set<Cleanup>();
let handlersInstalled = false;

/**
 * Runs `fn` with a Cleanup that runs afterwards, pass or fail, and also when
 * the benchmark is interrupted (SIGINT, SIGTERM): QEMUs started by vmferry sit
 * in their own process groups and would outlive a plain exit.
 */
export async function withCleanup<T>(fn: (cleanup: Cleanup) => Promise<T>): Promise<T> {
  if (!handlersInstalled) {
    handlersInstalled = true;
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.once(signal, () => {
        console.error(`\n${signal}: cleaning up`);
        void (async () => {
          for (const cleanup of live) await cleanup.run().catch((err: unknown) => console.error(String(err)));
          process.exit(130);
        })();
      });
    }
  }
  const cleanup = new Cleanup();
  live.add(cleanup);
  try {
    return await fn(cleanup);
  } finally {
    live.delete(cleanup);
    await cleanup.run();
  }
}

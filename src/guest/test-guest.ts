/**
 * The host side of vmferry's test guest (guest/vmferry-guest.c): its files,
 * its kernel command line, the boot that runs it (a VmSpec's, or a
 * CreateVmRequest's for the demo and the tests: the agent's API knows no test
 * guest), and the reader of what it reports on its second serial port (ttyS1).
 *
 * Lines the guest writes:
 *   READY <disk> <disk>…           workload started on these writable disks
 *   FOUND <disk> highest=<k> missing=<x> corrupt=<m>
 *                                   at the workload's start: what its disk held (it writes on from k + 1)
 *   ACK <disk> <k>                  record k is durable on <disk>
 *   VERIFY <disk> highest=<k> intact=<n> corrupt=<m> missing=<x>
 *   VERIFY-DONE                     verify finished; the guest powers off
 *   STREAM port=<n>                 the numbered TCP stream (demo/stream-check.ts) listens
 *   IOBENCH-START <job>, IOBENCH <job> ios=<n> bytes=<n> usec=<n>, IOBENCH-DONE
 *                                   iobench's jobs (read by bench/storage-guest.ts)
 *   GUEST-ERROR <text>              the guest failed and powers off
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import type { BootSpec, DiskSpec, VmSpec } from '../qemu/spec.ts';
import { Deadline } from '../util/abort.ts';

const buildDir = resolve(import.meta.dirname, '../../build/guest');

/**
 * The kernel is the uncompressed vmlinux, which QEMU boots through its PVH
 * entry: a bzImage spends most of a TCG boot decompressing itself.
 */
export function testGuestPaths(): { kernel: string; initrd: string } {
  const kernel = join(buildDir, 'vmlinux');
  const initrd = join(buildDir, 'initramfs.cpio.gz');
  if (!existsSync(kernel) || !existsSync(initrd)) {
    throw new VmferryError('VMF_TOOL_MISSING', `the test guest is not built (${buildDir}): run scripts/setup.sh`);
  }
  return { kernel, initrd };
}

/**
 * The test guest as a bootable disk image (scripts/build-test-disk.sh): its
 * boot loader starts the workload with guestKernelAppend({ mode: 'workload' }),
 * and the records go to its second partition.
 */
/** Where the test guest's kernel, initrd and disk image are: an agent that runs it trusts this directory (--trusted-dir). */
export function testGuestDir(): string {
  return buildDir;
}

export function testGuestDiskImage(): string {
  const image = join(buildDir, 'disk.qcow2');
  if (!existsSync(image)) throw new VmferryError('VMF_TOOL_MISSING', `the test guest's disk image is not built (${image}): run scripts/setup.sh`);
  return image;
}

export interface GuestOptions {
  mode: 'workload' | 'verify' | 'iobench';
  /** Size of the record area at the start of each disk, in MiB (default 64, capped by the disk). */
  spanMiB?: number;
  /** Memory the guest keeps dirtying, in MiB, and how fast (MiB/s). */
  dirtyMiB?: number;
  dirtyRateMiBs?: number;
  /** Unacknowledged bulk writes after the record area, MiB/s per disk. */
  bulkMiBs?: number;
  /** Limit bulk writes to these disk ids. */
  bulkDisks?: string[];
  /** Pause between records on each disk. */
  intervalMs?: number;
  /** Address of the first NIC (eth0), CIDR, e.g. 10.213.9.10/24: set by the guest's init. */
  ip?: string;
  /** Serve the numbered TCP stream (stream-check.ts) on this port. */
  streamPort?: number;
  /** iobench: its jobs, each `<rw>:<block KiB>:<depth>` (guest/vmferry-guest.c), and seconds per job. */
  ioJobs?: string[];
  ioSeconds?: number;
}

export function guestKernelAppend(options: GuestOptions): string {
  // The kernel's own checks (crypto self-tests, the W+X walk after marking rodata, picking CPU-bug
  // mitigations) are a third of a TCG boot and guard nothing the test guest does: off, it boots a
  // quarter faster, and every test boots it (README, "Tests").
  const words = ['console=ttyS0', 'quiet', 'panic=-1', 'cryptomgr.notests', 'rodata=off', 'mitigations=off', `vmferry.mode=${options.mode}`];
  if (options.spanMiB !== undefined) words.push(`vmferry.span_mib=${options.spanMiB}`);
  if (options.dirtyMiB !== undefined) words.push(`vmferry.dirty_mib=${options.dirtyMiB}`);
  if (options.dirtyRateMiBs !== undefined) words.push(`vmferry.dirty_rate_mib=${options.dirtyRateMiBs}`);
  if (options.bulkMiBs !== undefined) words.push(`vmferry.bulk_mib_s=${options.bulkMiBs}`);
  if (options.bulkDisks?.length) words.push(`vmferry.bulk_disks=${options.bulkDisks.join(',')}`);
  if (options.intervalMs !== undefined) words.push(`vmferry.interval_ms=${options.intervalMs}`);
  if (options.ip !== undefined) words.push(`vmferry.ip=${options.ip}`);
  if (options.streamPort !== undefined) words.push(`vmferry.stream_port=${options.streamPort}`);
  if (options.ioJobs?.length) words.push(`vmferry.io_jobs=${options.ioJobs.join(',')}`);
  if (options.ioSeconds !== undefined) words.push(`vmferry.io_seconds=${options.ioSeconds}`);
  return words.join(' ');
}

/** The direct kernel boot of the test guest, its files as this machine has them. */
function testGuestKernelBoot(options: GuestOptions): Extract<BootSpec, { kind: 'kernel' }> {
  return { kind: 'kernel', ...testGuestPaths(), append: guestKernelAppend(options) };
}

/**
 * What a CreateVmRequest needs to run the test guest's workload: its kernel
 * boot and two serial ports, the console and the report channel (serial1.log).
 * The agent knows no test guest: it boots these files as any kernel, so it
 * must trust testGuestDir() (--trusted-dir) and see them at the same path,
 * which the demo's and the tests' clusters on one machine do.
 */
export function testGuestBoot(options: Omit<GuestOptions, 'mode'> = {}): { boot: Extract<BootSpec, { kind: 'kernel' }>; serialPorts: number } {
  return { boot: testGuestKernelBoot({ mode: 'workload', ...options }), serialPorts: 2 };
}

/** A VmSpec that runs the test guest on `disks`, its console and report channel logged under `logDir`. */
export function testGuestSpec(name: string, disks: DiskSpec[], logDir: string, options: GuestOptions, memoryMiB = 256): VmSpec {
  return {
    name,
    vcpus: 1,
    memoryMiB,
    boot: testGuestKernelBoot(options),
    disks,
    serialLogs: [join(logDir, `${name}-console.log`), join(logDir, `${name}-report.log`)],
  };
}

/** The report channel's log of a spec built by testGuestSpec (its second serial port). */
export function reportLogOf(spec: VmSpec): string {
  const log = spec.serialLogs?.[1];
  if (!log) throw new VmferryError('VMF_INVALID_SPEC', `VM ${spec.name} has no report channel (serialLogs[1])`);
  return log;
}

export interface VerifyResult {
  disk: string;
  highest: number;
  intact: number;
  corrupt: number;
  missing: number;
}

/** What a workload found on a disk when it started: its records go on after the highest. */
export interface FoundRecords {
  highest: number;
  missing: number;
  corrupt: number;
}

export interface GuestReport {
  /** Highest acknowledged record per disk. */
  acks: Map<string, number>;
  /** Per disk, what the last workload to start found there. */
  found: Map<string, FoundRecords>;
  ready: string[] | undefined;
  verify: Map<string, VerifyResult>;
  verifyDone: boolean;
  errors: string[];
}

const verifyLine = /^VERIFY (\S+) highest=(\d+) intact=(\d+) corrupt=(\d+) missing=(\d+)$/;
const foundLine = /^FOUND (\S+) highest=(\d+) missing=(\d+) corrupt=(\d+)$/;

/** Parses report-channel text; several logs (source, then destination) merge in order. */
export function parseGuestReport(texts: string[]): GuestReport {
  const report: GuestReport = { acks: new Map(), found: new Map(), ready: undefined, verify: new Map(), verifyDone: false, errors: [] };
  for (const text of texts) {
    for (const raw of text.split('\n')) {
      const line = raw.replace(/\r$/, '');
      const words = line.split(' ');
      if (words[0] === 'ACK' && words.length === 3) {
        const k = Number(words[2]);
        const disk = words[1] as string;
        if (Number.isInteger(k) && k > (report.acks.get(disk) ?? 0)) report.acks.set(disk, k);
      } else if (words[0] === 'READY') {
        report.ready = words.slice(1);
      } else if (line === 'VERIFY-DONE') {
        report.verifyDone = true;
      } else if (words[0] === 'GUEST-ERROR') {
        report.errors.push(line.slice('GUEST-ERROR '.length));
      } else if (foundLine.test(line)) {
        const [, disk, highest, missing, corrupt] = foundLine.exec(line) ?? [];
        report.found.set(disk as string, { highest: Number(highest), missing: Number(missing), corrupt: Number(corrupt) });
      } else {
        const m = verifyLine.exec(line);
        if (m) {
          report.verify.set(m[1] as string, {
            disk: m[1] as string,
            highest: Number(m[2]),
            intact: Number(m[3]),
            corrupt: Number(m[4]),
            missing: Number(m[5]),
          });
        }
      }
    }
  }
  return report;
}

export async function readGuestReport(logPaths: string[]): Promise<GuestReport> {
  const texts = await Promise.all(logPaths.map((path) => readFile(path, 'utf8').catch(() => '')));
  return parseGuestReport(texts);
}

/**
 * Polls the logs until `done` holds for the report, or fails after timeoutMs
 * with what the guest said so far.
 */
export async function waitForGuest(
  logPaths: string[],
  what: string,
  done: (report: GuestReport) => boolean,
  options: { timeoutMs: number; signal?: AbortSignal },
): Promise<GuestReport> {
  using deadline = new Deadline(`waiting for the test guest: ${what}`, options.timeoutMs, options.signal);
  for (;;) {
    const report = await readGuestReport(logPaths);
    if (report.errors.length) throw new VmferryError('VMF_MIGRATION_FAILED', `test guest failed: ${report.errors.join('; ')}`);
    if (done(report)) return report;
    if (deadline.signal.aborted) {
      const acks = JSON.stringify(Object.fromEntries(report.acks));
      throw new VmferryError('VMF_TIMEOUT', `test guest never reached "${what}" within ${options.timeoutMs} ms (acks so far: ${acks})`);
    }
    await sleep(100);
  }
}

/** Waits until every disk in `disks` has at least `atLeast` more acks than in `since`. */
export function waitForAcks(
  logPaths: string[],
  disks: string[],
  options: { atLeast: number; since?: Map<string, number>; timeoutMs: number; signal?: AbortSignal },
): Promise<GuestReport> {
  return waitForGuest(
    logPaths,
    `${options.atLeast} new acks on ${disks.join(', ')}`,
    (report) => disks.every((disk) => (report.acks.get(disk) ?? 0) >= (options.since?.get(disk) ?? 0) + options.atLeast),
    options,
  );
}

/** Problems with a verify run against what was acknowledged; empty when every acked record is intact. */
export function checkVerify(verify: Map<string, VerifyResult>, acked: Map<string, number>): string[] {
  const problems: string[] = [];
  for (const [disk, k] of acked) {
    const result = verify.get(disk);
    if (!result) {
      problems.push(`disk ${disk}: acknowledged up to record ${k} but verify did not see the disk`);
      continue;
    }
    if (result.highest < k) problems.push(`disk ${disk}: acknowledged record ${k} but the highest intact record is ${result.highest}`);
  }
  for (const result of verify.values()) {
    if (result.corrupt > 0) problems.push(`disk ${result.disk}: ${result.corrupt} corrupt records`);
    if (result.missing > 0) problems.push(`disk ${result.disk}: ${result.missing} records missing below the highest`);
  }
  return problems;
}

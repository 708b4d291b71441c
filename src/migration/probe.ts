/**
 * Gathers the facts the planner decides on, by asking the real system: image
 * allocation from qemu-img, shared volumes by actually connecting to them from
 * the host in question, machine types from the QEMU binary, memory from the kernel.
 */
import { open, readFile } from 'node:fs/promises';
import { VmferryError } from '../errors.ts';
import type { Accelerator } from '../qemu/command-line.ts';
import { queryCpuModels, qemuBuiltinCpuModel, type CpuModels } from '../qemu/cpu-models.ts';
import { defaultQemuBinary } from '../qemu/command-line.ts';
import type { QemuProcess } from '../qemu/process.ts';
import type { NbdServerAddress, VmSpec } from '../qemu/spec.ts';
import { nbdImageArgs } from '../storage/disk-images.ts';
import type { LocalPool } from '../storage/local-pool.ts';
import { existingBridges } from '../qemu/taps.ts';
import { imageInfo } from '../storage/local-pool.ts';
import { runProgram } from '../util/run.ts';
import { pollUntil } from '../util/poll.ts';
import { guestRamAddress, memoryDigestMaxMiB, pageBytes, writtenPages } from '../qemu/memory-digest.ts';
import type { GuestRamFacts } from './prediction.ts';
import { qemuImageJson, type RbdImageRef } from '../storage/rbd.ts';
import { exportKey, rbdKey, type DestinationFacts, type LocalDiskFacts, type SourceFacts } from './plan.ts';

export interface QemuCapabilities {
  version: string;
  /** Every machine type, with aliases resolved: { q35: 'pc-q35-7.2', 'pc-q35-7.2': 'pc-q35-7.2', … }. */
  machines: Record<string, string>;
  /** The accelerator the host runs guests under: what the CPU models below were asked for. */
  accelerator: Accelerator;
  /** Every CPU model, with the features QEMU cannot offer under that accelerator. */
  cpuModels: CpuModels;
}

/** The QEMU binary's version, from `--version` alone: asking starts no QEMU. */
export async function qemuVersion(binary = defaultQemuBinary): Promise<string> {
  return /version (\S+)/.exec(await runProgram(binary, ['--version']))?.[1] ?? 'unknown';
}

/** What this host's QEMU runs under `accel` (default TCG, as tests and benchmarks start QEMU). */
export async function qemuCapabilities(accel: Accelerator = 'tcg', binary = defaultQemuBinary): Promise<QemuCapabilities> {
  const version = await qemuVersion(binary);
  const machines: Record<string, string> = {};
  for (const line of (await runProgram(binary, ['-machine', 'help'])).split('\n')) {
    const match = /^(\S+)\s+.*?(?:\(alias of (\S+)\))?$/.exec(line);
    if (!match || match[1] === 'Supported') continue;
    machines[match[1] as string] = match[2] ?? (match[1] as string);
  }
  return { version, machines, accelerator: accel, cpuModels: await queryCpuModels(accel, binary) };
}

/**
 * Connects to a shared export the way QEMU will (under TLS with the host's QEMU
 * credentials, `tlsDir`), and returns its size, or undefined when unreachable.
 */
export async function probeExport(server: NbdServerAddress, exportName: string, tlsDir?: string): Promise<number | undefined> {
  const image = nbdImageArgs(server, exportName, tlsDir);
  try {
    const info = JSON.parse(await runProgram('qemu-img', ['info', '--output=json', ...image], { timeoutMs: 10_000 })) as {
      'virtual-size': number;
    };
    return info['virtual-size'];
  } catch (err) {
    if (err instanceof VmferryError && err.code === 'VMF_TOOL_MISSING') throw err;
    return undefined;
  }
}

/**
 * Opens an RBD image the way QEMU will (librbd, the disk's conf and user) and
 * returns its size, or undefined when this host cannot open it (no route to
 * the monitors, no key, no such image). Bounded: an unreachable cluster makes
 * librados wait for its monitors, so qemu-img is given up on after 20 s.
 */
export async function probeRbdImage(ref: RbdImageRef): Promise<number | undefined> {
  try {
    const info = JSON.parse(await runProgram('qemu-img', ['info', '--output=json', qemuImageJson(ref)], { timeoutMs: 20_000 })) as { 'virtual-size': number };
    return info['virtual-size'];
  } catch (err) {
    if (err instanceof VmferryError && err.code === 'VMF_TOOL_MISSING') throw err;
    return undefined;
  }
}

async function availableMemoryMiB(): Promise<number> {
  const meminfo = await readFile('/proc/meminfo', 'utf8');
  const kib = Number(/^MemAvailable:\s+(\d+) kB/m.exec(meminfo)?.[1] ?? 0);
  return Math.floor(kib / 1024);
}

export async function probeSource(hostId: string, vm: QemuProcess, qemu: QemuCapabilities): Promise<SourceFacts> {
  const spec = vm.spec;
  const kvm = await vm.qmp('asking which accelerator runs the guest', (qmp) => qmp.queryKvm());
  // An overlay on a shared base moves alone: its own data is what the mirror sends.
  const localDisks: Record<string, LocalDiskFacts> = Object.fromEntries(
    await Promise.all(
      spec.disks.flatMap(({ id, source }) => (source.kind === 'file' ? [imageInfo(source.path, source.format, { ownDataOnly: source.backing !== undefined }).then((info) => [id, info] as const)] : [])),
    ),
  );
  const requested = spec.machine ?? 'q35';
  return { hostId, qemuVersion: qemu.version, machineType: qemu.machines[requested] ?? requested, accelerator: kvm.enabled ? 'kvm' : 'tcg', localDisks };
}

/** Facts about this host as the destination for `spec`; run on the destination host, with its QEMU credentials (`tlsDir`) if it has them. */
export async function probeDestination(
  hostId: string,
  address: string,
  spec: VmSpec,
  pool: LocalPool,
  vmNames: string[],
  qemu: QemuCapabilities,
  tlsDir?: string,
): Promise<DestinationFacts> {
  const reachableExports: Record<string, number> = {};
  // Shared volumes, and the shared bases of overlays: both are re-attached, not copied.
  const shared = spec.disks.flatMap((disk) => (disk.source.kind === 'nbd' ? [disk.source] : disk.source.kind === 'file' && disk.source.backing ? [disk.source.backing] : []));
  for (const { server, export: exportName } of shared) {
    const size = await probeExport(server, exportName, tlsDir);
    if (size !== undefined) reachableExports[exportKey(server, exportName)] = size;
  }
  for (const disk of spec.disks) {
    if (disk.source.kind !== 'rbd') continue;
    const size = await probeRbdImage(disk.source);
    if (size !== undefined) reachableExports[rbdKey(disk.source.pool, disk.source.image)] = size;
  }
  const cpuModel = spec.cpu ?? qemuBuiltinCpuModel;
  return {
    hostId,
    address,
    qemuVersion: qemu.version,
    machineTypes: [...new Set(Object.values(qemu.machines))],
    accelerator: qemu.accelerator,
    cpu: { model: cpuModel, unavailableFeatures: qemu.cpuModels[cpuModel] ?? null },
    freeMemoryMiB: await availableMemoryMiB(),
    poolFreeBytes: await pool.freeBytes(),
    reachableExports,
    vmNames,
    bridges: await existingBridges((spec.nics ?? []).map((nic) => nic.bridge)),
  };
}

/** Long enough for a guest that dirties a few MiB/s to show it in QEMU's whole-MiB/s figure; the dry run waits for it. */
const dirtyRateCalcTimeS = 1;
/** QEMU's upper bound: the more pages sampled, the less a small dirty rate is lost in the sampling. */
const dirtyRateSamplePagesPerGiB = 4096;

/**
 * How fast the running guest dirties its memory and how much of it holds data, for the prediction
 * (src/migration/prediction.ts). The dirty rate is QEMU's page-sampling estimate (it hashes sampled pages
 * twice, `dirtyRateCalcTimeS` apart); the memory in use is read from the host's page tables of QEMU's guest
 * RAM, as the memory digest reads them, so the guest is not touched.
 */
export async function measureGuestRam(vm: QemuProcess, signal?: AbortSignal): Promise<GuestRamFacts> {
  await vm.qmp('starting the dirty-rate measurement', (qmp) => qmp.calcDirtyRate(dirtyRateCalcTimeS, dirtyRateSamplePagesPerGiB));
  const inUse = await ramInUse(vm);
  const mibPerS = await pollUntil(
    async () => {
      const info = await vm.qmp('asking for the dirty rate', (qmp) => qmp.queryDirtyRate());
      return info.status === 'measured' ? (info['dirty-rate'] ?? 0) : undefined;
    },
    { timeoutMs: dirtyRateCalcTimeS * 1000 + 5000, intervalMs: 100, timeoutMessage: `QEMU of VM ${vm.spec.name} did not finish measuring its dirty rate`, ...(signal ? { signal } : {}) },
  );
  return {
    dirtyRateBytesPerS: mibPerS * 1024 * 1024,
    dirtyRateMethod: `page-sampling, ${dirtyRateSamplePagesPerGiB} pages per GiB`,
    calcTimeS: dirtyRateCalcTimeS,
    ...inUse,
  };
}

/** Pages read to tell how many of those the page tables call written hold only zeros: a few ms of reads. */
const inUseSamplePages = 2048;

async function ramInUse(vm: QemuProcess): Promise<Pick<GuestRamFacts, 'inUseBytes' | 'inUseBasis'>> {
  const size = vm.spec.memoryMiB * 1024 * 1024;
  // Larger guests' RAM is split around the PCI hole: not one block at guest address 0.
  if (vm.spec.memoryMiB > memoryDigestMaxMiB) return { inUseBytes: size, inUseBasis: `all of its RAM (over ${memoryDigestMaxMiB} MiB: its page tables not read)` };
  try {
    const address = await guestRamAddress(vm);
    const written = await writtenPages(vm.pid, address, size);
    // A guest kernel zeroes the pages it hands out: written, yet QEMU sends each as a zero page. A sample tells their share.
    const step = Math.max(1, written.length / inUseSamplePages);
    const page = Buffer.alloc(pageBytes);
    const memory = await open(`/proc/${vm.pid}/mem`, 'r');
    let sampled = 0;
    let holdingData = 0;
    try {
      for (let i = 0; i < written.length; i += step) {
        await memory.read(page, 0, pageBytes, address + (written[Math.floor(i)] as number) * pageBytes);
        sampled++;
        if (page.some((byte) => byte !== 0)) holdingData++;
      }
    } finally {
      await memory.close();
    }
    const share = sampled === 0 ? 0 : holdingData / sampled;
    return {
      inUseBytes: Math.round(written.length * pageBytes * share),
      inUseBasis: `pages of the guest's RAM the host's page tables show written (${Math.round((written.length * pageBytes) / 1048576)} MiB), ${Math.round(share * 100)} % of ${sampled} read holding data`,
    };
  } catch (err) {
    return { inUseBytes: size, inUseBasis: `all of its RAM (its page tables could not be read: ${err instanceof Error ? err.message : String(err)})` };
  }
}

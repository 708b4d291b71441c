/**
 * Gathers the facts the planner decides on, by asking the real system: image
 * allocation from qemu-img, shared volumes by actually connecting to them from
 * the host in question, machine types from the QEMU binary, memory from the kernel.
 */
import { readFile } from 'node:fs/promises';
import { VmferryError } from '../errors.ts';
import { defaultQemuBinary, type QemuProcess } from '../qemu/process.ts';
import type { NbdServerAddress, VmSpec } from '../qemu/spec.ts';
import type { LocalPool } from '../storage/local-pool.ts';
import { existingBridges } from '../qemu/taps.ts';
import { imageInfo } from '../storage/local-pool.ts';
import { runProgram } from '../util/run.ts';
import { exportKey, type DestinationFacts, type LocalDiskFacts, type SourceFacts } from './plan.ts';

export interface QemuCapabilities {
  version: string;
  /** Every machine type, with aliases resolved: { q35: 'pc-q35-7.2', 'pc-q35-7.2': 'pc-q35-7.2', … }. */
  machines: Record<string, string>;
}

export async function qemuCapabilities(binary = defaultQemuBinary): Promise<QemuCapabilities> {
  const versionText = await runProgram(binary, ['--version']);
  const version = /version (\S+)/.exec(versionText)?.[1] ?? 'unknown';
  const machines: Record<string, string> = {};
  for (const line of (await runProgram(binary, ['-machine', 'help'])).split('\n')) {
    const match = /^(\S+)\s+.*?(?:\(alias of (\S+)\))?$/.exec(line);
    if (!match || match[1] === 'Supported') continue;
    machines[match[1] as string] = match[2] ?? (match[1] as string);
  }
  return { version, machines };
}

function nbdUri(server: NbdServerAddress, exportName: string): string {
  return server.type === 'inet'
    ? `nbd://${server.host}:${server.port}/${encodeURIComponent(exportName)}`
    : `nbd+unix:///${encodeURIComponent(exportName)}?socket=${server.path}`;
}

/** Connects to a shared export the way QEMU will, and returns its size, or undefined when unreachable. */
export async function probeExport(server: NbdServerAddress, exportName: string): Promise<number | undefined> {
  try {
    const info = JSON.parse(await runProgram('qemu-img', ['info', '--output=json', nbdUri(server, exportName)], { timeoutMs: 10_000 })) as {
      'virtual-size': number;
    };
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
  const localDisks: Record<string, LocalDiskFacts> = {};
  for (const disk of spec.disks) {
    if (disk.source.kind === 'file') localDisks[disk.id] = await imageInfo(disk.source.path, disk.source.format);
  }
  const requested = spec.machine ?? 'q35';
  return { hostId, qemuVersion: qemu.version, machineType: qemu.machines[requested] ?? requested, accelerator: kvm.enabled ? 'kvm' : 'tcg', localDisks };
}

/** Facts about this host as the destination for `spec`; run on the destination host. */
export async function probeDestination(
  hostId: string,
  spec: VmSpec,
  pool: LocalPool,
  vmNames: string[],
  qemu: QemuCapabilities,
): Promise<DestinationFacts> {
  const reachableExports: Record<string, number> = {};
  for (const disk of spec.disks) {
    if (disk.source.kind !== 'nbd') continue;
    const size = await probeExport(disk.source.server, disk.source.export);
    if (size !== undefined) reachableExports[exportKey(disk.source.server, disk.source.export)] = size;
  }
  return {
    hostId,
    qemuVersion: qemu.version,
    machineTypes: [...new Set(Object.values(qemu.machines))],
    freeMemoryMiB: await availableMemoryMiB(),
    poolFreeBytes: await pool.freeBytes(),
    reachableExports,
    vmNames,
    bridges: await existingBridges((spec.nics ?? []).map((nic) => nic.bridge)),
  };
}

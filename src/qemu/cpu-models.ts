/**
 * CPU models: the default a VM gets, and which models this host's QEMU can
 * run under its accelerator. A guest sees its CPU model's features and may
 * use any of them at any time, so a destination must offer every one; QEMU
 * reports what it cannot offer per model (`query-cpu-definitions`,
 * `unavailable-features`), for the accelerator it was started with.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VmferryError, describeError } from '../errors.ts';
import { QmpClient } from '../qmp/client.ts';
import type { Accelerator } from './command-line.ts';
import { defaultQemuBinary } from './command-line.ts';

/**
 * The model a new VM gets unless `--cpu` names another (README, "CPU model").
 * A versioned name, so its feature set never changes with a QEMU upgrade or a
 * machine type (an unversioned alias such as `qemu64` may resolve to a later
 * version). qemu64-v1 is QEMU's own default CPU: vendor-neutral, runnable
 * under TCG (query-cpu-definitions on QEMU 7.2 reports no unavailable feature)
 * and on any x86-64 KVM host, so every host of a cluster can take the VM.
 * Guests built for x86-64-v2 (RHEL 9 and later) need more: `--cpu Nehalem-v1`
 * (SSE4.2, POPCNT) or `Westmere-v1` (also AES), both runnable under TCG here.
 */
export const defaultCpuModel = 'qemu64-v1';

/** What QEMU picks when a spec names no model (VMs created before vmferry set one). */
export const qemuBuiltinCpuModel = 'qemu64';

/** Every CPU model the QEMU binary knows, with the features it cannot offer under one accelerator (empty: runnable). */
export type CpuModels = Record<string, string[]>;

interface CpuDefinition {
  name: string;
  'unavailable-features'?: string[];
}

/**
 * Asks a short-lived QEMU (`-machine none`: no guest, no devices, quick)
 * started with `accel` which CPU models it can run.
 */
export async function queryCpuModels(accel: Accelerator, binary = defaultQemuBinary): Promise<CpuModels> {
  const dir = await mkdtemp(join(tmpdir(), 'vmferry-cpu-models-'));
  const socket = join(dir, 'qmp.sock');
  const args = ['-machine', 'none', '-accel', accel, '-nodefaults', '-no-user-config', '-display', 'none', '-qmp', `unix:${socket},server=on,wait=off`];
  const child = spawn(binary, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-2000);
  });
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const spawnFailed = new Promise<never>((_, reject) => child.once('error', reject));
  spawnFailed.catch(() => undefined);
  let client: QmpClient | undefined;
  try {
    // A QEMU without a guest answers in a fraction of a second, but one started beside busy TCG guests on a loaded
    // host has taken over 10 s (test/faults/no-return.test.ts, in a full run): the migration asking waits for it.
    client = await Promise.race([QmpClient.connect(socket, { timeoutMs: 30_000 }), spawnFailed]);
    const definitions = await client.execute<CpuDefinition[]>('query-cpu-definitions');
    return Object.fromEntries(definitions.map((d) => [d.name, d['unavailable-features'] ?? []]));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'VMF_TOOL_MISSING' : 'VMF_QEMU_START';
    throw new VmferryError(code, `cannot ask ${binary} (-accel ${accel}) which CPU models it runs: ${stderr.trim() || describeError(err)}`, { cause: err });
  } finally {
    client?.close();
    child.kill('SIGKILL');
    await exited;
    await rm(dir, { recursive: true, force: true });
  }
}

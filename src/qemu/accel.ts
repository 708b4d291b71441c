/**
 * Which accelerator runs this host's guests. `/dev/kvm` existing is not
 * enough: on nested or misconfigured hosts it opens, QEMU starts, and the
 * guest never executes an instruction. So KVM counts only when a probe guest
 * (one boot sector that writes a marker to the serial port) actually runs
 * under it within a few seconds; otherwise the host uses TCG and says why.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VmferryError, describeError } from '../errors.ts';
import { defaultQemuBinary, type Accelerator } from './command-line.ts';

export type AccelMode = Accelerator | 'auto';
export const accelModes: readonly AccelMode[] = ['auto', 'kvm', 'tcg'];

/** The accelerator a host uses for every QEMU it starts, and why, for its log and `vmferry host list`. */
export interface HostAccelerator {
  accelerator: Accelerator;
  reason: string;
}

export interface KvmProbeOptions {
  binary?: string;
  /** How long the probe guest may take to print its marker. */
  timeoutMs?: number;
  kvmDevice?: string;
}

/** Far beyond what a working KVM needs to reach the marker (even TCG needs less: test/qemu/accel.test.ts); a hung guest never does. */
export const defaultKvmProbeTimeoutMs = 3_000;

export const probeMarker = 'VMFERRY-KVM-PROBE-OK';

/**
 * A 512-byte boot sector, 16-bit real mode, loaded by SeaBIOS at 0x7c00:
 *   cli; xor ax,ax; mov ds,ax; cld; mov si,0x7c17; mov dx,0x3f8
 *   next: lodsb; test al,al; jz done; out dx,al; jmp next
 *   done: hlt; jmp done
 * followed by the marker (at offset 0x17) and the 0x55 0xaa signature.
 * QEMU's UART transmits what is written to its data register without setup.
 */
export function probeBootSector(): Buffer {
  const code = [0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0xfc, 0xbe, 0x17, 0x7c, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xf4, 0xeb, 0xfd];
  const sector = Buffer.alloc(512);
  Buffer.from(code).copy(sector, 0);
  sector.write(`${probeMarker}\r\n\0`, code.length, 'latin1');
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

export type KvmProbeResult = { ok: true; ms: number } | { ok: false; reason: string };

/** Whether a guest really runs under KVM on this host. Never throws: a failure is a reason. */
export async function probeKvm(options: KvmProbeOptions = {}): Promise<KvmProbeResult> {
  const device = options.kvmDevice ?? '/dev/kvm';
  try {
    const handle = await open(device, constants.O_RDWR);
    await handle.close();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return { ok: false, reason: `no ${device} (the kvm module is not loaded, or the CPU has no virtualization)` };
    return { ok: false, reason: `cannot open ${device}: ${code ?? describeError(err)}` };
  }
  const dir = await mkdtemp(join(tmpdir(), 'vmferry-kvm-probe-'));
  try {
    const image = join(dir, 'boot.img');
    await writeFile(image, probeBootSector());
    return await runProbeGuest(options.binary ?? defaultQemuBinary, image, options.timeoutMs ?? defaultKvmProbeTimeoutMs);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function runProbeGuest(binary: string, image: string, timeoutMs: number): Promise<KvmProbeResult> {
  const started = Date.now();
  const args = [
    '-accel', 'kvm', '-machine', 'pc', '-m', '16', '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-drive', `file=${image},format=raw,if=floppy,readonly=on`,
    '-serial', 'stdio',
  ];
  return new Promise((resolve) => {
    const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let serial = '';
    let stderr = '';
    let result: KvmProbeResult | undefined;
    // Resolved only once QEMU has exited, so no probe guest outlives the probe.
    const finish = (outcome: KvmProbeResult): void => {
      result ??= outcome;
      clearTimeout(timer);
      child.kill('SIGKILL');
    };
    const timer = setTimeout(() => finish({ ok: false, reason: `a probe guest started under KVM did not run within ${(timeoutMs / 1000).toFixed(1)} s (it hung)` }), timeoutMs);
    child.stdout.on('data', (chunk: Buffer) => {
      serial += chunk.toString('latin1');
      if (serial.includes(probeMarker)) finish({ ok: true, ms: Date.now() - started });
    });
    child.stderr.on('data', (chunk: Buffer) => {
      stderr = (stderr + chunk.toString()).slice(-2000);
    });
    child.once('error', (err) => {
      clearTimeout(timer);
      resolve({ ok: false, reason: `cannot run ${binary}: ${err.message}` });
    });
    child.once('close', (code, signal) => {
      const errors = stderr.trim().split('\n').filter((line) => line && !line.includes('warning:')).join('; ');
      finish({ ok: false, reason: `QEMU exited (code ${code}, signal ${signal}) before a probe guest ran under KVM: ${errors || stderr.trim() || 'no output'}` });
      resolve(result as KvmProbeResult);
    });
  });
}

/**
 * The accelerator for `--accel MODE`: `tcg` as asked, without a probe; `kvm`
 * only when the probe guest runs, else VMF_ACCEL_UNAVAILABLE naming why;
 * `auto` KVM when the probe guest runs, TCG with the probe's failure otherwise.
 */
export async function chooseAccelerator(mode: AccelMode, options: KvmProbeOptions = {}): Promise<HostAccelerator> {
  if (mode === 'tcg') return { accelerator: 'tcg', reason: 'chosen with --accel tcg (KVM not probed)' };
  const probe = await probeKvm(options);
  if (probe.ok) return { accelerator: 'kvm', reason: `a probe guest ran under KVM in ${probe.ms} ms` };
  if (mode === 'kvm') {
    throw new VmferryError('VMF_ACCEL_UNAVAILABLE', `--accel kvm: KVM cannot run guests on this host: ${probe.reason}; start the agent with --accel auto or --accel tcg`);
  }
  return { accelerator: 'tcg', reason: `KVM unusable: ${probe.reason}` };
}

export function parseAccelMode(text: string, option: string): AccelMode {
  if (!(accelModes as readonly string[]).includes(text)) {
    throw new VmferryError('VMF_INVALID_ARGUMENT', `${option} must be one of ${accelModes.join(', ')} (got "${text}")`);
  }
  return text as AccelMode;
}

/**
 * The host side of a VM's NICs: one tap per NIC, created on the NIC's bridge
 * before QEMU opens it and removed once QEMU is gone. A tap made here is
 * persistent (it outlives the QEMU that used it), so every path that ends a
 * QEMU removes its taps, and an agent that restarts finds them by name.
 *
 * Names are derived, never stored: `vft` + role + 8 hex digits of the VM
 * name's hash + `n` + the NIC's position, at most 14 characters (the kernel
 * allows 15). The role keeps the two QEMUs of a migration apart should both
 * ends ever share a host: `r` for a VM started here, `i` for a migration's
 * incoming QEMU (which keeps its taps when the guest then runs here).
 */
import { createHash } from 'node:crypto';
import { VmferryError } from '../errors.ts';
import { runProgram } from '../util/run.ts';
import type { VmSpec } from './spec.ts';

export type TapRole = 'run' | 'incoming';

function vmPart(vm: string): string {
  return createHash('sha256').update(vm).digest('hex').slice(0, 8);
}

export function tapName(vm: string, nicIndex: number, role: TapRole): string {
  return `vft${role === 'run' ? 'r' : 'i'}${vmPart(vm)}n${nicIndex}`;
}

/** Whether `ifname` is one of VM `vm`'s taps, of either role. */
export function isTapOf(vm: string, ifname: string): boolean {
  return new RegExp(`^vft[ri]${vmPart(vm)}n\\d+$`).test(ifname);
}

async function ip(args: string[]): Promise<string> {
  return runProgram('ip', args, { timeoutMs: 10_000 });
}

interface LinkInfo {
  ifname: string;
  linkinfo?: { info_kind?: string };
}

async function links(): Promise<LinkInfo[]> {
  return JSON.parse(await ip(['-j', '-d', 'link', 'show'])) as LinkInfo[];
}

/** The bridges among `names` that exist on this host (in this network namespace). */
export async function existingBridges(names: string[]): Promise<string[]> {
  if (names.length === 0) return [];
  const bridges = new Set((await links()).filter((l) => l.linkinfo?.info_kind === 'bridge').map((l) => l.ifname));
  return names.filter((name) => bridges.has(name));
}

/** Every tap of VM `vm` on this host, of either role. */
export async function tapsOf(vm: string): Promise<string[]> {
  return (await links()).map((l) => l.ifname).filter((name) => isTapOf(vm, name));
}

export async function removeTap(name: string): Promise<void> {
  await ip(['link', 'del', 'dev', name]).catch(async (err: unknown) => {
    // Already gone is what we wanted; anything else (a tap that will not go) is worth an error.
    if ((await links()).some((l) => l.ifname === name)) throw err;
  });
}

/**
 * Creates the taps of `spec`'s NICs for a QEMU of `role`, each up and on its
 * bridge; a leftover of the same name (an earlier QEMU that died) is replaced.
 * On failure the taps made so far are removed. Returns their names, in NIC order.
 */
export async function createTaps(spec: VmSpec, role: TapRole): Promise<string[]> {
  const nics = spec.nics ?? [];
  if (nics.length === 0) return [];
  const bridges = await existingBridges(nics.map((n) => n.bridge));
  const missing = nics.find((n) => !bridges.includes(n.bridge));
  if (missing) throw new VmferryError('VMF_NETWORK', `NIC ${missing.id} of VM ${spec.name}: this host has no bridge ${missing.bridge}`);
  const created: string[] = [];
  try {
    for (const [index, nic] of nics.entries()) {
      const name = tapName(spec.name, index, role);
      await removeTap(name);
      await ip(['tuntap', 'add', 'dev', name, 'mode', 'tap']);
      created.push(name);
      await ip(['link', 'set', 'dev', name, 'master', nic.bridge]);
      await ip(['link', 'set', 'dev', name, 'up']);
    }
    return created;
  } catch (err) {
    for (const name of created) await removeTap(name).catch(() => undefined);
    if (err instanceof VmferryError && err.code === 'VMF_TOOL_MISSING') throw err;
    throw new VmferryError('VMF_NETWORK', `cannot set up the taps of VM ${spec.name}: ${(err as Error).message}`, { cause: err });
  }
}

/** Removes the taps of VM `vm` of one role (or both), whatever QEMU they belonged to. */
export async function removeTapsOf(vm: string, role?: TapRole): Promise<void> {
  const prefix = role ? tapName(vm, 0, role).slice(0, -1) : undefined;
  for (const name of await tapsOf(vm)) {
    if (prefix === undefined || name.startsWith(prefix)) await removeTap(name);
  }
}

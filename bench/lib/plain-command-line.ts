/**
 * The QEMU command line of the independent baseline (plain-qmp.ts), written the
 * way a user writes one by hand, with nothing taken from vmferry's
 * qemuArguments: `-machine pc`, ordinary anonymous RAM, QEMU's default cache
 * (writeback: the host page cache, flushes passed on), devices on whatever
 * PCI slots QEMU picks (both ends use the same line, so they match).
 *
 * Each of vmferry's own choices can be switched on one at a time (PlainKnobs),
 * so the benchmark can tell which of them costs time or raises the rate at
 * which QEMU 7.2 under TCG loses pre-copy writes (bench/variants.ts).
 */
import type { VmSpec } from '../../src/qemu/spec.ts';

/** The choices vmferry makes that a user's QEMU does not; the defaults are the user's. */
export interface PlainKnobs {
  /** vmferry: q35. Users and libvirt's older default: pc (i440FX). */
  machine: 'pc' | 'q35';
  /** vmferry keeps a TCG guest's RAM in a shared memfd (for its memory comparison). */
  memfd: boolean;
  /** vmferry: none (O_DIRECT). QEMU's default: writeback. */
  cache: 'writeback' | 'none';
  /** vmferry: write-blocking. QEMU's default: background. */
  copyMode: 'background' | 'write-blocking';
  /**
   * vmferry polls query-migrate and query-block-jobs every 250 ms during the
   * mirror and RAM phases (it reacts to events too). 0: events only.
   */
  pollMs: number;
  /**
   * After B's incoming migration completed and before `cont`: dump both ends'
   * RAM and compare it (the post-hoc check of docs/BENCHMARKS.md). It lengthens
   * the pause, so runs with it say nothing about the pause.
   */
  compareRam: boolean;
}

export const userKnobs: PlainKnobs = { machine: 'pc', memfd: false, cache: 'writeback', copyMode: 'background', pollMs: 0, compareRam: false };

/** vmferry's choices on the same baseline (the compare is vmferry's too, done post hoc). */
export const vmferryKnobs: PlainKnobs = { machine: 'q35', memfd: true, cache: 'none', copyMode: 'write-blocking', pollMs: 250, compareRam: true };

/** The node name plain-qmp.ts mirrors from (source) and exports (destination). */
export function plainDiskNode(id: string): string {
  return `disk-${id}`;
}

export function plainQemuArguments(spec: VmSpec, knobs: PlainKnobs, mode: 'run' | 'incoming', qmpSocket: string): string[] {
  const ram = knobs.memfd ? ['-object', `memory-backend-memfd,id=ram,size=${spec.memoryMiB}M,share=on`] : [];
  const args = [
    '-name', spec.name,
    '-machine', knobs.memfd ? `${knobs.machine},memory-backend=ram` : knobs.machine,
    ...ram,
    '-accel', 'tcg',
    '-m', `${spec.memoryMiB}M`,
    '-smp', String(spec.vcpus),
    '-nodefaults',
    '-display', 'none',
    '-chardev', `socket,id=qmp,path=${qmpSocket},server=on,wait=off`,
    '-mon', 'chardev=qmp,mode=control',
  ];
  if (spec.boot.kind !== 'kernel') throw new Error('the plain baseline boots the test guest\'s kernel only');
  args.push('-kernel', spec.boot.kernel);
  if (spec.boot.initrd) args.push('-initrd', spec.boot.initrd);
  if (spec.boot.append) args.push('-append', spec.boot.append);
  const direct = knobs.cache === 'none';
  for (const disk of spec.disks) {
    const node = plainDiskNode(disk.id);
    const source = disk.source;
    if (source.kind === 'nbd') {
      if (source.server.type !== 'inet') throw new Error('the plain baseline reaches shared volumes over TCP only');
      args.push('-blockdev', JSON.stringify({ driver: 'nbd', 'node-name': node, server: { type: 'inet', host: source.server.host, port: String(source.server.port) }, export: source.export }));
    } else if (source.kind === 'rbd') {
      args.push('-blockdev', JSON.stringify({ driver: 'rbd', 'node-name': node, pool: source.pool, image: source.image, conf: source.conf, user: source.user }));
    } else {
      args.push('-blockdev', JSON.stringify({ driver: 'file', 'node-name': `${node}-file`, filename: source.path, cache: { direct }, discard: 'unmap' }));
      args.push('-blockdev', JSON.stringify({ driver: source.format, 'node-name': node, file: `${node}-file`, cache: { direct }, discard: 'unmap' }));
    }
    args.push('-device', `virtio-blk-pci,drive=${node},id=${disk.id},serial=${disk.id}`);
  }
  (spec.serialLogs ?? []).forEach((path, index) => {
    args.push('-chardev', `file,id=serial${index},path=${path}`, '-serial', `chardev:serial${index}`);
  });
  if (mode === 'incoming') args.push('-incoming', 'defer', '-S');
  return args;
}

/** A short label of the knobs that differ from a user's, e.g. "q35+memfd". */
export function knobsLabel(knobs: PlainKnobs): string {
  const parts: string[] = [];
  if (knobs.machine !== userKnobs.machine) parts.push(knobs.machine);
  if (knobs.memfd) parts.push('memfd');
  if (knobs.cache !== userKnobs.cache) parts.push(`cache=${knobs.cache}`);
  if (knobs.copyMode !== userKnobs.copyMode) parts.push(knobs.copyMode);
  if (knobs.pollMs > 0) parts.push(`poll${knobs.pollMs}`);
  return parts.length ? parts.join('+') : 'user';
}

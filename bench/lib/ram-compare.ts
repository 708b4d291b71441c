/**
 * The post-hoc check of a plain migration: both ends stopped (A after its last
 * pass, B before its first instruction), each one's guest RAM dumped with
 * pmemsave to tmpfs and compared MiB by MiB, as vmferry's memory comparison
 * does at switch-over (src/qemu/memory-digest.ts), but byte for byte.
 */
import { open, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { mib } from './common.ts';

type Execute = (command: string, args: Record<string, unknown>) => Promise<unknown>;

/** Indexes of the 1 MiB chunks of guest RAM [0, memoryMiB) that differ between the two QEMUs. */
export async function compareGuestRam(a: Execute, b: Execute, memoryMiB: number): Promise<number[]> {
  const tag = randomBytes(6).toString('hex');
  const paths = [`/dev/shm/vmferry-bench-cmp-a-${tag}`, `/dev/shm/vmferry-bench-cmp-b-${tag}`] as const;
  try {
    await Promise.all([
      a('pmemsave', { val: 0, size: memoryMiB * mib, filename: paths[0] }),
      b('pmemsave', { val: 0, size: memoryMiB * mib, filename: paths[1] }),
    ]);
    const [fa, fb] = await Promise.all(paths.map((p) => open(p, 'r')));
    if (!fa || !fb) throw new Error('no RAM dumps');
    try {
      const differing: number[] = [];
      const [ba, bb] = [Buffer.alloc(mib), Buffer.alloc(mib)];
      for (let chunk = 0; chunk < memoryMiB; chunk++) {
        await Promise.all([fa.read(ba, 0, mib, chunk * mib), fb.read(bb, 0, mib, chunk * mib)]);
        if (!ba.equals(bb)) differing.push(chunk);
      }
      return differing;
    } finally {
      await Promise.all([fa.close(), fb.close()]);
    }
  } finally {
    await Promise.all(paths.map((p) => rm(p, { force: true })));
  }
}

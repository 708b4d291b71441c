/** Boots the test guest in verify mode on a set of disks and returns what it found. */
import { join } from 'node:path';
import { QemuProcess } from '../qemu/process.ts';
import type { DiskSpec } from '../qemu/spec.ts';
import { reportLogOf, testGuestSpec, waitForGuest, type VerifyResult } from './test-guest.ts';

export async function verifyDisks(
  disks: DiskSpec[],
  workDir: string,
  /** tlsDir: an agent's identity in QEMU's layout, for disks behind a server that takes TLS only. */
  options: { spanMiB?: number; timeoutMs?: number; tlsDir?: string } = {},
): Promise<Map<string, VerifyResult>> {
  const spec = testGuestSpec('verify', disks, workDir, { mode: 'verify', spanMiB: options.spanMiB });
  const vm = await QemuProcess.start(spec, { runDir: join(workDir, 'verify-run'), ...(options.tlsDir === undefined ? {} : { tlsDir: options.tlsDir }) });
  try {
    const report = await waitForGuest([reportLogOf(spec)], 'VERIFY-DONE', (r) => r.verifyDone, { timeoutMs: options.timeoutMs ?? 120_000 });
    return report.verify;
  } finally {
    await vm.stop({ quitTimeoutMs: 5_000 });
    await vm.cleanup();
  }
}

/**
 * Temporary directories that a test removes afterwards, pass or fail; with VMFERRY_TEST_KEEP=1 they are kept and
 * named on stderr, for the logs of a run that failed once in many.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export async function makeTempDir(prefix: string): Promise<{ path: string; remove(): Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), `vmferry-${prefix}-`));
  if (process.env.VMFERRY_TEST_KEEP === '1') {
    return {
      path,
      remove: () => {
        process.stderr.write(`kept ${path} (VMFERRY_TEST_KEEP=1)\n`);
        return Promise.resolve();
      },
    };
  }
  return { path, remove: () => rm(path, { recursive: true, force: true }) };
}

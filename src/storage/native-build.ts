/**
 * Builds the storage server's small C programs and addons (src/storage/native/) with the system's cc into
 * build/native/, on first use and again whenever the source is newer. Callers fall back to a slower path
 * when there is no compiler, and say so.
 */
import { execFile as execFileCallback } from 'node:child_process';
import { mkdir, rename, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';

const execFile = promisify(execFileCallback);

/** Where `name`, built from native/`source`, lives. */
export function nativeOutput(name: string): string {
  return resolve(import.meta.dirname, '..', '..', 'build', 'native', name);
}

/** Returns the built file's path; throws with cc's own words when it cannot be built. */
export async function buildNative(source: string, name: string, ccArgs: readonly string[]): Promise<string> {
  const sourcePath = join(import.meta.dirname, 'native', source);
  const output = nativeOutput(name);
  const [sourceStat, outputStat] = await Promise.all([stat(sourcePath), stat(output).catch(() => undefined)]);
  if (outputStat && outputStat.mtimeMs >= sourceStat.mtimeMs) return output;
  await mkdir(join(output, '..'), { recursive: true });
  // Built beside and renamed into place, so servers starting at once never load a half-written file.
  const temporary = `${output}.${process.pid}.tmp`;
  await execFile('cc', ['-O2', '-Wall', ...ccArgs, '-o', temporary, sourcePath], { timeout: 60_000 });
  await rename(temporary, output);
  return output;
}

/**
 * Builds vmferry's small C programs and Node addons (the `native/` folders beside the modules that use them) with
 * the system's cc into build/native/, on first use and again whenever the source is newer. Callers fall back to a
 * slower path when there is no compiler, and say so.
 */
import { execFile as execFileCallback } from 'node:child_process';
import { mkdir, rename, stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';

const execFile = promisify(execFileCallback);

/** Where `name` is built. */
export function nativeOutput(name: string): string {
  return resolve(import.meta.dirname, '..', '..', 'build', 'native', name);
}

/** Builds `sourcePath` into `name`; returns the built file's path, or throws with cc's own words. */
export async function buildNative(sourcePath: string, name: string, ccArgs: readonly string[]): Promise<string> {
  const output = nativeOutput(name);
  const [sourceStat, outputStat] = await Promise.all([stat(sourcePath), stat(output).catch(() => undefined)]);
  if (outputStat && outputStat.mtimeMs >= sourceStat.mtimeMs) return output;
  await mkdir(join(output, '..'), { recursive: true });
  // Built beside and renamed into place, so processes starting at once never load a half-written file.
  const temporary = `${output}.${process.pid}.tmp`;
  await execFile('cc', ['-O2', '-Wall', ...ccArgs, '-o', temporary, sourcePath], { timeout: 60_000 });
  await rename(temporary, output);
  return output;
}

/** Node's own headers, as the nodejs package installs them beside its binary. */
const nodeHeaders = join(dirname(dirname(process.execPath)), 'include', 'node');

/** Builds the Node addon `sourcePath` into `name` and loads it; throws with cc's or the loader's words. */
export async function loadAddon<T>(sourcePath: string, name: string): Promise<T> {
  return createRequire(import.meta.url)(await buildNative(sourcePath, name, ['-shared', '-fPIC', `-I${nodeHeaders}`])) as T;
}

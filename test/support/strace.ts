/**
 * Runs a TypeScript script under strace and returns the file-system syscalls
 * it made, in the order they completed, with the paths of their descriptors
 * (strace -y). What a test sees here is what the kernel was asked to do, not
 * what the code meant to do: the closest thing to a power cut short of one.
 */
import { execFile as execFileCallback } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { makeTempDir } from './temp.ts';

const execFile = promisify(execFileCallback);

export interface Syscall {
  name: string;
  /** The raw argument text, e.g. `23</tmp/x/spec.json>` or `"/a", "/b"` (rename). */
  args: string;
  result: string;
}

const complete = /^(\d+)\s+(\w+)\((.*)\)\s+= (.*)$/;
const unfinished = /^(\d+)\s+(\w+)\((.*) <unfinished \.\.\.>$/;
const resumed = /^(\d+)\s+<\.\.\. (\w+) resumed>(.*)\)\s+= (.*)$/;

/** The traced syscalls of `node --import tsx script args…`; a write to stdout shows as `write` on `1<pipe:…>`. */
export async function traceScript(script: string, args: string[], syscalls: string[]): Promise<Syscall[]> {
  const dir = await makeTempDir('strace');
  try {
    const output = join(dir.path, 'trace');
    await execFile('strace', ['-f', '-y', '-qq', '-s', '256', '-e', `trace=${syscalls.join(',')}`, '-o', output, process.execPath, '--import', 'tsx', script, ...args], {
      timeout: 120_000,
    });
    const calls: Syscall[] = [];
    const pending = new Map<string, { name: string; args: string }>();
    for (const line of (await readFile(output, 'utf8')).split('\n')) {
      let match = complete.exec(line);
      if (match) {
        calls.push({ name: match[2] as string, args: match[3] as string, result: match[4] as string });
        continue;
      }
      match = unfinished.exec(line);
      if (match) {
        pending.set(match[1] as string, { name: match[2] as string, args: match[3] as string });
        continue;
      }
      match = resumed.exec(line);
      const started = match && pending.get(match[1] as string);
      if (match && started) {
        pending.delete(match[1] as string);
        calls.push({ name: started.name, args: started.args + (match[3] as string), result: match[4] as string });
      }
    }
    return calls;
  } finally {
    await dir.remove();
  }
}

/** The path of the descriptor an fsync-like call synced (strace -y prints `fd</path>`). */
export function syncedPath(call: Syscall): string | undefined {
  return /^\d+<(.*)>$/.exec(call.args)?.[1];
}

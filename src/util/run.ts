/** Runs external programs (qemu-img and friends) with errors that say what failed and why. */
import { execFile } from 'node:child_process';
import { VmferryError } from '../errors.ts';

export interface RunOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** Runs `program args…` and resolves with its stdout; a failure carries the command and its stderr. */
export function runProgram(program: string, args: string[], options: RunOptions = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      program,
      args,
      { timeout: options.timeoutMs ?? 60_000, signal: options.signal, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' },
      (err, stdout, stderr) => {
        if (!err) {
          resolve(stdout);
          return;
        }
        const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
        const code = missing ? 'VMF_TOOL_MISSING' : 'VMF_COMMAND_FAILED';
        const detail = missing ? 'not installed (run scripts/setup.sh)' : stderr.trim() || err.message;
        reject(new VmferryError(code, `${program} ${args.join(' ')}: ${detail}`, { cause: err }));
      },
    );
  });
}

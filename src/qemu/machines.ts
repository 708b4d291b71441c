/** The machine types a QEMU binary knows, from `-machine help`. */
import { VmferryError } from '../errors.ts';
import { runProgram } from '../util/run.ts';
import { defaultQemuBinary } from './command-line.ts';

/** Machine type names (`pc-q35-7.2`, `q35`, …), or undefined when no such QEMU is installed here. */
export async function qemuMachineTypes(binary = defaultQemuBinary): Promise<string[] | undefined> {
  let output: string;
  try {
    output = await runProgram(binary, ['-machine', 'help'], { timeoutMs: 10_000 });
  } catch (err) {
    if (err instanceof VmferryError && err.code === 'VMF_TOOL_MISSING') return undefined;
    throw err;
  }
  // After a "Supported machines are:" header, one machine per line: its name, then a description.
  return output
    .split('\n')
    .slice(1)
    .map((line) => line.trim().split(/\s+/)[0] ?? '')
    .filter((name) => name !== '');
}

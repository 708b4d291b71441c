// The throwaway Ceph cluster lives in src/demo/ceph.ts (the demo runs one too); qemu-io as a Ceph client is the tests' own.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { qemuImageJson, type RbdImageRef } from '../../src/storage/rbd.ts';

export { startCeph, type TestCeph } from '../../src/demo/ceph.ts';

/** An interactive qemu-io on an RBD image: one librbd client that stays open between commands, as a QEMU's would. */
export class QemuIo {
  readonly #child: ChildProcessWithoutNullStreams;
  #output = '';

  private constructor(child: ChildProcessWithoutNullStreams) {
    this.#child = child;
    child.stdout.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (this.#output += chunk.toString()));
  }

  static async open(ref: RbdImageRef): Promise<QemuIo> {
    const io = new QemuIo(spawn('qemu-io', [qemuImageJson(ref)]));
    await io.#prompt();
    return io;
  }

  /** Runs one command and returns what it printed, once qemu-io asks for the next. */
  async run(command: string): Promise<string> {
    this.#output = '';
    this.#child.stdin.write(`${command}\n`);
    return this.#prompt();
  }

  async #prompt(): Promise<string> {
    const deadline = Date.now() + 30_000;
    while (!this.#output.includes('qemu-io> ')) {
      if (this.#child.exitCode !== null) throw new Error(`qemu-io exited: ${this.#output}`);
      if (Date.now() > deadline) throw new Error(`qemu-io did not answer within 30 s: ${this.#output}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return this.#output.replace('qemu-io> ', '');
  }

  async close(): Promise<void> {
    if (this.#child.exitCode !== null) return;
    const exited = new Promise((resolve) => this.#child.once('exit', resolve));
    this.#child.stdin.end('quit\n');
    const timer = setTimeout(() => this.#child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
}

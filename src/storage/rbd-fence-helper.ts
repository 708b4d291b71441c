/**
 * The switch-over fence of RBD images, kept ready in a process of its own
 * (rbd-fence-helper.py, on Debian's python3-rados and python3-rbd): started
 * while the migration prepares, it holds a connected librados client and each
 * image open read-only, so that the fence in the guest's pause is one message
 * and a few cluster round trips instead of starting `rbd status` and
 * `ceph osd blocklist add` (each a new cluster client, and `ceph` a Python
 * program: together most of half a second; docs/BENCHMARKS.md).
 *
 * Bounded everywhere: librados gives up on each call after `opTimeoutS`, and
 * each request has a deadline after which the helper is killed and the request
 * fails. It dies with this process, and `stop()` kills it at once.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { VmferryError } from '../errors.ts';
import { checkCephName, type RbdImageRef } from './rbd.ts';

/** Debian's python3-rados is built for the system's interpreter, not for another python3 that may come first on PATH. */
const python = '/usr/bin/python3';
const script = join(import.meta.dirname, 'rbd-fence-helper.py');

/** librados's bound on one cluster call inside the helper, in seconds. */
const opTimeoutS = 8;
/** Starting the interpreter, connecting and opening the images: as long as the CLI's own bound on one command. */
const startDeadlineMs = 30_000;
/** One request once it runs: a little over librados's own bound, so a Ceph error normally comes back before the kill. */
const requestDeadlineMs = (opTimeoutS + 2) * 1000;

/** An image the helper holds, under the key its replies use (a disk id). */
export interface HeldImage {
  key: string;
  ref: RbdImageRef;
}

interface Reply {
  id: number;
  ok: boolean;
  error?: string;
  fenced?: Record<string, string[]>;
}

interface Pending {
  resolve: (reply: Reply) => void;
  reject: (err: Error) => void;
}

export class RbdFenceHelper {
  readonly #child: ChildProcessWithoutNullStreams;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #gone: VmferryError | undefined;
  #stderr = '';

  private constructor(child: ChildProcessWithoutNullStreams) {
    this.#child = child;
    createInterface({ input: child.stdout }).on('line', (line) => this.#onLine(line));
    child.stderr.on('data', (chunk: Buffer) => (this.#stderr = (this.#stderr + chunk.toString()).slice(-2_000)));
    child.stdin.on('error', () => undefined);
    child.on('error', (err) => this.#end(`could not run ${python} ${script}: ${err.message}`));
    // 'close' comes after the streams ended, so the error names what it printed before it died.
    child.on('close', (code, signal) => this.#end(`exited (${signal ?? `code ${String(code)}`})${this.#stderr.trim() ? `: ${this.#stderr.trim()}` : ''}`));
  }

  /** The helper, connected and holding `images`; throws (and leaves nothing running) if it cannot get there. */
  static async start(images: HeldImage[]): Promise<RbdFenceHelper> {
    // -I: isolated from PYTHONPATH, the user's site-packages and the working directory; it imports only what Debian installed.
    const helper = new RbdFenceHelper(spawn(python, ['-I', script, String(opTimeoutS)], { stdio: ['pipe', 'pipe', 'pipe'] }));
    try {
      const open = images.map(({ key, ref }) => ({ key, conf: ref.conf, user: ref.user, pool: checkCephName(ref.pool, 'pool'), image: checkCephName(ref.image, 'image') }));
      await helper.#request('connect and open the images', { op: 'open', images: open }, startDeadlineMs);
      return helper;
    } catch (err) {
      helper.stop();
      throw err;
    }
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  /** Blocklists every watcher of each held image but its `own` ones, all at once; returns the fenced addresses by key. */
  async fence(own: Map<string, string[]>): Promise<Map<string, string[]>> {
    const reply = await this.#request('fence the other clients', { op: 'fence', own: Object.fromEntries(own) }, requestDeadlineMs);
    return new Map(Object.entries(reply.fenced ?? {}));
  }

  /** Kills it, now; idempotent. Nothing it was asked and has not answered succeeds after this. */
  stop(): void {
    if (this.#child.exitCode === null && this.#child.signalCode === null) this.#child.kill('SIGKILL');
  }

  #request(what: string, body: object, deadlineMs: number): Promise<Reply> {
    if (this.#gone) return Promise.reject(this.#gone);
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        this.stop();
        reject(new VmferryError('VMF_TIMEOUT', `the RBD fence helper (pid ${String(this.pid)}) did not ${what} within ${deadlineMs} ms, and was killed`));
      }, deadlineMs);
      this.#pending.set(id, {
        resolve: (reply) => {
          clearTimeout(timer);
          if (reply.ok) resolve(reply);
          else reject(new VmferryError('VMF_COMMAND_FAILED', `the RBD fence helper could not ${what}: ${reply.error ?? 'no reason given'}`));
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      });
      this.#child.stdin.write(`${JSON.stringify({ id, ...body })}\n`);
    });
  }

  #onLine(line: string): void {
    let reply: Reply;
    try {
      reply = JSON.parse(line) as Reply;
    } catch {
      this.#stderr = (this.#stderr + line).slice(-2_000);
      return;
    }
    const pending = this.#pending.get(reply.id);
    this.#pending.delete(reply.id);
    pending?.resolve(reply);
  }

  #end(why: string): void {
    this.#gone ??= new VmferryError('VMF_COMMAND_FAILED', `the RBD fence helper (pid ${String(this.pid)}) ${why}`);
    for (const pending of this.#pending.values()) pending.reject(this.#gone);
    this.#pending.clear();
  }
}

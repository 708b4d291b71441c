/**
 * Turns Nagle's algorithm off on a QEMU's listening TCP socket (native/socket-nodelay.c), so that what it
 * accepts answers small messages at once. QEMU 7.2's NBD server leaves Nagle on and writes a negotiation
 * reply's header and payload apart; the client holds its ACK, and each such reply waited for the delayed-ACK
 * timer, in every mirror's connection to its target (docs/BENCHMARKS.md, issue 22). QMP has no
 * option for it, and handing QEMU a listener of our own needs fd passing over the monitor, which Node cannot do.
 */
import { join } from 'node:path';
import { describeError } from '../errors.ts';
import { loadAddon } from '../util/native-build.ts';

interface SocketNoDelayAddon {
  setNoDelay(pid: number, port: number): number;
}

let addon: Promise<SocketNoDelayAddon> | undefined;

function load(): Promise<SocketNoDelayAddon> {
  addon ??= loadAddon<SocketNoDelayAddon>(join(import.meta.dirname, 'native', 'socket-nodelay.c'), 'vmferry-socket-nodelay.node').catch((err: unknown) => {
    addon = undefined;
    throw err;
  });
  return addon;
}

/** Builds and loads the addon ahead of its first use (a compile takes a while on a fresh install); errors wait for setNoDelay. */
export function preloadSetNoDelay(): void {
  load().catch(() => undefined);
}

/**
 * Sets TCP_NODELAY on every TCP socket of process `pid` bound to `port`; returns how many there were.
 * Rejects, naming the cause, where it cannot (no compiler for the addon, no ptrace access to `pid`, a kernel
 * before 5.6): only speed is lost then, so callers log it and go on.
 */
export async function setNoDelay(pid: number, port: number): Promise<number> {
  try {
    return (await load()).setNoDelay(pid, port);
  } catch (err) {
    throw new Error(`cannot turn Nagle's algorithm off on port ${port} of process ${pid}: ${describeError(err)}`, { cause: err });
  }
}

/**
 * Waiting for a condition nothing announces (a daemon answering, a phase
 * reached): ask every `intervalMs`, give up after `timeoutMs`. Each loop that
 * did this by hand had its own deadline arithmetic; this one is bounded in
 * time and count, and stops early when the signal aborts.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import { abortError } from './abort.ts';

export interface PollOptions {
  timeoutMs: number;
  intervalMs: number;
  /** The VMF_TIMEOUT message: what did not happen, and within how long (a function: with what was last seen). */
  timeoutMessage: string | (() => string);
  signal?: AbortSignal;
}

/**
 * Calls `check` until it returns a value other than undefined, and returns
 * that. `check` throws to give up at once (the process it waits for exited);
 * after `timeoutMs` the poll rejects with VMF_TIMEOUT.
 */
export async function pollUntil<T>(check: () => Promise<T | undefined> | T | undefined, options: PollOptions): Promise<T> {
  const deadline = Date.now() + options.timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new VmferryError('VMF_TIMEOUT', typeof options.timeoutMessage === 'string' ? options.timeoutMessage : options.timeoutMessage());
    const signal = options.signal;
    await sleep(options.intervalMs, undefined, signal ? { signal } : undefined).catch((err: unknown) => {
      throw signal?.aborted ? abortError(signal, 'the wait') : err;
    });
  }
}

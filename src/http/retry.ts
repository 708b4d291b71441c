/**
 * Retries with backoff for requests whose repetition cannot change what the
 * first one did: reads, status polls, and the calls an agent handles
 * idempotently by design. A reset connection or a restarting server then costs
 * a moment instead of a migration. Everything else — starting a mirror or a
 * migration, migrate-continue, a destination's resume, retire — is never
 * repeated here: when its reply is lost the caller cannot know whether it ran,
 * and the executor's own rules (the destination's fate, recovery) decide.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError, hasCode } from '../errors.ts';
import { abortError } from '../util/abort.ts';

export interface RetryPolicy {
  /** Tries in all, the first included. */
  attempts: number;
  /** The wait before the second try; each later wait doubles, up to maxDelayMs. */
  firstDelayMs: number;
  maxDelayMs: number;
  /** No try starts later than this after the first. */
  budgetMs: number;
}

/**
 * Enough to ride out a reset connection or an agent restarting under systemd,
 * short against a migration's stall timeout, so a host that is really gone is
 * still reported as one.
 */
export const idempotentRetry: RetryPolicy = { attempts: 4, firstDelayMs: 200, maxDelayMs: 2_000, budgetMs: 10_000 };

/**
 * Failures where the request may not have reached the server, or its reply did
 * not reach us: nothing the server decided. An answer with a code (not found,
 * conflict, …) or a timeout of the call's own deadline is final.
 */
function transient(err: unknown): boolean {
  return hasCode(err, 'VMF_UNREACHABLE');
}

/** Calls `call` until it succeeds, fails for good, or the policy is spent; `what` names it in the final error. */
export async function retryIdempotent<T>(what: string, call: () => Promise<T>, options: { signal?: AbortSignal | undefined; policy?: RetryPolicy; onRetry?: (err: unknown, attempt: number, delayMs: number) => void } = {}): Promise<T> {
  const policy = options.policy ?? idempotentRetry;
  const started = Date.now();
  for (let attempt = 1; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      if (!transient(err) || options.signal?.aborted) throw err;
      // Half to all of the exponential step: callers that failed together do not retry together.
      const step = Math.min(policy.maxDelayMs, policy.firstDelayMs * 2 ** (attempt - 1));
      const delayMs = Math.round(step / 2 + (Math.random() * step) / 2);
      const elapsed = Date.now() - started;
      if (attempt >= policy.attempts || elapsed + delayMs > policy.budgetMs) {
        throw new VmferryError('VMF_UNREACHABLE', `${what}: ${(err as Error).message} (tried ${attempt} times over ${elapsed} ms)`, { cause: err });
      }
      options.onRetry?.(err, attempt, delayMs);
      try {
        await sleep(delayMs, undefined, options.signal ? { signal: options.signal } : {});
      } catch {
        throw abortError(options.signal ?? AbortSignal.abort(), what);
      }
    }
  }
}

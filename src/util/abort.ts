/**
 * AbortSignal plumbing shared by every wait in vmferry: deadlines whose reason
 * says what timed out, and races that remove their listener afterwards.
 */
import { VmferryError } from '../errors.ts';
import { setTimeout as sleep } from 'node:timers/promises';

/** The error an aborted signal stands for; a bare abort() becomes VMF_ABORTED. */
export function abortError(signal: AbortSignal, what: string): Error {
  const reason: unknown = signal.reason;
  if (reason instanceof Error && reason.name !== 'AbortError') return reason;
  return new VmferryError('VMF_ABORTED', `${what} was cancelled`, { cause: reason });
}

/**
 * A signal that aborts when `parent` does or after `timeoutMs`, with a
 * VMF_TIMEOUT reason naming `what`. Dispose of it when the guarded work ends
 * (`using deadline = new Deadline(…)`, or dispose() where the work ends in a
 * promise's callback), so neither the timer nor the parent listener outlives it.
 */
export class Deadline implements Disposable {
  readonly signal: AbortSignal;
  readonly #controller = new AbortController();
  readonly #timer: NodeJS.Timeout | undefined;
  readonly #parent: AbortSignal | undefined;
  readonly #onParentAbort = (): void => {
    this.#controller.abort(this.#parent?.reason);
  };

  constructor(what: string, timeoutMs: number | undefined, parent?: AbortSignal) {
    this.signal = this.#controller.signal;
    this.#parent = parent;
    if (parent?.aborted) {
      this.#controller.abort(parent.reason);
      return;
    }
    parent?.addEventListener('abort', this.#onParentAbort, { once: true });
    if (timeoutMs !== undefined && Number.isFinite(timeoutMs)) {
      this.#timer = setTimeout(() => {
        this.#controller.abort(new VmferryError('VMF_TIMEOUT', `${what} did not finish within ${timeoutMs} ms`));
      }, timeoutMs);
    }
  }

  dispose(): void {
    clearTimeout(this.#timer);
    this.#parent?.removeEventListener('abort', this.#onParentAbort);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * Like AbortSignal.timeout, but its reason is a VMF_TIMEOUT naming `what`: a
 * DOMException TimeoutError would reach users and HTTP clients as an internal error.
 * The timer does not keep the process alive.
 */
export function timeoutSignal(what: string, timeoutMs: number): AbortSignal {
  const controller = new AbortController();
  setTimeout(() => controller.abort(new VmferryError('VMF_TIMEOUT', `${what} did not finish within ${timeoutMs} ms`)), timeoutMs).unref();
  return controller.signal;
}

/** Settles like `promise`, or rejects with the signal's reason if it aborts first. */
export function raceAbort<T>(promise: Promise<T>, signal: AbortSignal | undefined, what: string): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) {
    // The work was started anyway; its outcome no longer matters, but must not go unhandled.
    promise.catch(() => undefined);
    return Promise.reject(abortError(signal, what));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(abortError(signal, what));
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(err instanceof Error ? err : new Error(String(err)));
      },
    );
  });
}

/** Runs `work` under a deadline, disposing of it however `work` ends. */
export async function withDeadline<T>(
  what: string,
  timeoutMs: number | undefined,
  parent: AbortSignal | undefined,
  work: (signal: AbortSignal) => Promise<T>,
): Promise<T> {
  using deadline = new Deadline(what, timeoutMs, parent);
  return await raceAbort(work(deadline.signal), deadline.signal, what);
}

/**
 * Waits until `promise` settles or `ms` pass, whichever is first, and leaves no timer behind: a poll loop's
 * sleep raced against a milestone would otherwise hold the process for a whole interval after the milestone.
 * Rejects as `promise` rejects or `signal` aborts.
 */
export async function waitAtMost(promise: Promise<unknown>, ms: number, signal: AbortSignal): Promise<void> {
  const timer = new AbortController();
  try {
    await Promise.race([promise, sleep(ms, undefined, { signal: AbortSignal.any([signal, timer.signal]) })]);
  } finally {
    timer.abort();
  }
}

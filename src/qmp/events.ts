/**
 * QMP events as a listener sees them: buffered from the moment it opens, so a
 * listener opened before the command that triggers an event cannot miss it.
 * Apart from the client, as QEMU's own library keeps events in their own module.
 */
import { VmferryError } from '../errors.ts';
import { Deadline, raceAbort } from '../util/abort.ts';
import type { JsonObject } from './message-stream.ts';

export interface QmpEvent {
  event: string;
  data: JsonObject;
  /** QEMU's timestamp of the event, in microseconds since the epoch. */
  timestampUs: number;
}

export interface WaitOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** A listener nobody reads from must not grow without bound during a long migration. */
const maxBufferedEvents = 10_000;

interface EventWaiter {
  matches(event: QmpEvent): boolean;
  resolve(event: QmpEvent): void;
  reject(err: Error): void;
}

/**
 * Events from the moment of listen(), in order, until closed. Several waits
 * may be open at once (one per block job, say): each event goes to the
 * oldest wait it matches, or else to the buffer for a later wait.
 */
export class QmpEventListener implements AsyncIterable<QmpEvent>, Disposable {
  readonly #onClose: (listener: QmpEventListener) => void;
  readonly #buffer: QmpEvent[] = [];
  readonly #waiters: EventWaiter[] = [];
  #endError: Error | undefined;
  #dropped = 0;

  constructor(onClose: (listener: QmpEventListener) => void) {
    this.#onClose = onClose;
  }

  /** Delivers an event; called by the client. */
  push(event: QmpEvent): void {
    const index = this.#waiters.findIndex((waiter) => waiter.matches(event));
    if (index >= 0) {
      const [waiter] = this.#waiters.splice(index, 1);
      waiter?.resolve(event);
      return;
    }
    if (this.#buffer.length >= maxBufferedEvents) {
      this.#buffer.shift();
      this.#dropped++;
    }
    this.#buffer.push(event);
  }

  /** Ends the listener: waits reject with `error`. Called by the client when the connection closes. */
  end(error: Error): void {
    this.#endError ??= error;
    for (const waiter of this.#waiters.splice(0)) waiter.reject(error);
  }

  /** Events dropped because nobody read them (the buffer is bounded). */
  get dropped(): number {
    return this.#dropped;
  }

  /** Takes the first buffered or future event named `event` (any event if '*') that satisfies `predicate`. */
  waitFor(event: string, predicate: (e: QmpEvent) => boolean = () => true, options: WaitOptions = {}): Promise<QmpEvent> {
    const matches = (e: QmpEvent): boolean => (event === '*' || e.event === event) && predicate(e);
    const index = this.#buffer.findIndex(matches);
    if (index >= 0) return Promise.resolve(this.#buffer.splice(index, 1)[0] as QmpEvent);
    if (this.#endError) return Promise.reject(this.#endError);
    const what = `waiting for QMP event ${event}`;
    const deadline = new Deadline(what, options.timeoutMs, options.signal);
    let waiter: EventWaiter | undefined;
    const wait = new Promise<QmpEvent>((resolve, reject) => {
      waiter = { matches, resolve, reject };
      this.#waiters.push(waiter);
    });
    return raceAbort(wait, deadline.signal, what).finally(() => {
      // A wait that timed out or was aborted must not take a later event from the buffer's next reader.
      const index = this.#waiters.indexOf(waiter as EventWaiter);
      if (index >= 0) this.#waiters.splice(index, 1);
      deadline.dispose();
    });
  }

  /** Removes and returns every buffered event named `event`, oldest first: facts read after the fact, such as when the guest stopped. */
  takeBuffered(event: string): QmpEvent[] {
    const taken = this.#buffer.filter((e) => e.event === event);
    if (taken.length > 0) this.#buffer.splice(0, this.#buffer.length, ...this.#buffer.filter((e) => e.event !== event));
    return taken;
  }

  /** The next event of any kind. */
  next(options: WaitOptions = {}): Promise<QmpEvent> {
    return this.waitFor('*', undefined, options);
  }

  close(): void {
    this.end(new VmferryError('VMF_QMP_CLOSED', 'event listener closed'));
    this.#onClose(this);
  }

  /** `using listener = client.listen()`: closed however the block ends, as QEMU's library scopes one with `with`. */
  [Symbol.dispose](): void {
    this.close();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<QmpEvent> {
    for (;;) {
      try {
        yield await this.next();
      } catch (err) {
        if (this.#endError && err === this.#endError) return;
        throw err;
      }
    }
  }
}

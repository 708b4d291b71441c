/**
 * One NBD server's memory budget, shared by all its connections: the bytes of
 * READ and WRITE requests being executed plus read replies not yet handed to
 * the kernel. Each connection is already bounded on its own; this bounds their
 * sum, so many clients that send large reads and never read the replies cannot
 * grow the server without limit.
 *
 * A connection over budget waits before it takes its next request, which means
 * it stops reading its socket (backpressure) rather than failing requests.
 * Fairness: a connection that holds nothing may always take one request, even
 * past the budget, so a well-behaved client keeps making progress however much
 * the others hold, and every wait ends, because what a connection holds is
 * released as its requests finish and their replies leave. Waiting connections
 * are otherwise served in the order they started waiting, so a large request
 * is not passed over forever by small ones.
 */

export class MemoryBudget {
  readonly capacityBytes: number;
  #usedBytes = 0;
  /** Connections waiting for budget, oldest first. */
  readonly #waiting: BudgetWait[] = [];
  #wakeScheduled = false;

  constructor(capacityBytes: number) {
    if (!Number.isSafeInteger(capacityBytes) || capacityBytes <= 0) {
      throw new RangeError(`an NBD memory budget must be a positive whole number of bytes (got ${capacityBytes})`);
    }
    this.capacityBytes = capacityBytes;
  }

  /** Bytes held right now by every connection together. */
  get usedBytes(): number {
    return this.#usedBytes;
  }

  /** How many connections are waiting for budget right now. */
  get waitingConnections(): number {
    return this.#waiting.length;
  }

  /** A connection's share of the budget. */
  account(): BudgetAccount {
    return new BudgetAccount({
      tryTake: (account, bytes) => this.#tryTake(account, bytes),
      wait: (wait) => this.#waiting.push(wait),
      stopWaiting: (account) => this.#stopWaiting(account),
      give: (bytes) => this.#give(bytes),
    });
  }

  #mayTake(account: BudgetAccount, bytes: number): boolean {
    return account.heldBytes === 0 || this.#usedBytes + bytes <= this.capacityBytes;
  }

  #tryTake(account: BudgetAccount, bytes: number): boolean {
    // A newcomer that fits still queues behind earlier waiters; only the one-request floor skips the queue.
    if (account.heldBytes !== 0 && this.#waiting.length > 0) return false;
    if (!this.#mayTake(account, bytes)) return false;
    this.#usedBytes += bytes;
    return true;
  }

  #stopWaiting(account: BudgetAccount): void {
    const index = this.#waiting.findIndex((wait) => wait.account === account);
    if (index >= 0) this.#waiting.splice(index, 1);
    // The one that left may have been what held the queue up.
    this.#scheduleWake();
  }

  #give(bytes: number): void {
    this.#usedBytes -= bytes;
    this.#scheduleWake();
  }

  /**
   * Budget given back is handed out once pending I/O has been seen: when many
   * clients hang up at once, the first to go would otherwise pass its budget to
   * others whose hang-up is not processed yet, which would spend it at once on
   * reads nobody will receive.
   */
  #scheduleWake(): void {
    if (this.#wakeScheduled || this.#waiting.length === 0) return;
    this.#wakeScheduled = true;
    setImmediate(() => {
      this.#wakeScheduled = false;
      this.#wakeWaiting();
    });
  }

  #wakeWaiting(): void {
    let blocked = false;
    for (const wait of [...this.#waiting]) {
      if (wait.account.heldBytes === 0 || (!blocked && this.#mayTake(wait.account, wait.bytes))) {
        this.#waiting.splice(this.#waiting.indexOf(wait), 1);
        this.#usedBytes += wait.bytes;
        wait.grant();
      } else {
        blocked = true;
      }
    }
  }
}

/** A connection waiting for `bytes`; grant() is called once they are taken for it. */
interface BudgetWait {
  account: BudgetAccount;
  bytes: number;
  grant(): void;
}

/** What an account may do to its budget. */
interface BudgetLedger {
  tryTake(account: BudgetAccount, bytes: number): boolean;
  wait(wait: BudgetWait): void;
  stopWaiting(account: BudgetAccount): void;
  give(bytes: number): void;
}

/** One connection's part of a MemoryBudget. Ends with close(), which gives back everything it still holds. */
export class BudgetAccount {
  readonly #ledger: BudgetLedger;
  #heldBytes = 0;
  #reject: ((err: Error) => void) | undefined;
  #ended: Error | undefined;

  constructor(ledger: BudgetLedger) {
    this.#ledger = ledger;
  }

  get heldBytes(): number {
    return this.#heldBytes;
  }

  /**
   * Resolves once `bytes` are held for this connection; waits while the
   * budget is spent. Rejects with the error given to cancel(), or once closed.
   * One acquire at a time: a connection takes its requests in order.
   */
  acquire(bytes: number): Promise<void> {
    if (this.#ended) return Promise.reject(this.#ended);
    if (this.#reject) return Promise.reject(new Error('an NBD connection asked for memory budget while its previous request was still waiting for it'));
    if (this.#ledger.tryTake(this, bytes)) {
      this.#heldBytes += bytes;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      this.#reject = reject;
      this.#ledger.wait({
        account: this,
        bytes,
        grant: () => {
          this.#reject = undefined;
          this.#heldBytes += bytes;
          resolve();
        },
      });
    });
  }

  /**
   * Takes `bytes` at once if acquire() would not wait, and says whether it
   * did: the common case costs no promise. When false, nothing was taken and
   * the caller awaits acquire().
   */
  tryAcquire(bytes: number): boolean {
    if (this.#ended || this.#reject || !this.#ledger.tryTake(this, bytes)) return false;
    this.#heldBytes += bytes;
    return true;
  }

  /** Gives back bytes an earlier acquire took; once the account has been closed this does nothing. */
  release(bytes: number): void {
    const given = Math.min(bytes, this.#heldBytes);
    if (given <= 0) return;
    this.#heldBytes -= given;
    this.#ledger.give(given);
  }

  /** A pending acquire, and every later one, rejects with `error`; what is held stays held until released. */
  cancel(error: Error): void {
    this.#ended ??= error;
    const reject = this.#reject;
    if (!reject) return;
    this.#reject = undefined;
    this.#ledger.stopWaiting(this);
    reject(this.#ended);
  }

  /** The connection is gone: gives back all it holds, and later acquires reject. */
  close(): void {
    this.cancel(new Error('the NBD connection has ended'));
    this.release(this.#heldBytes);
  }
}

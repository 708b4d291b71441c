/**
 * Tells the controller's live streams (event-stream.ts) that a migration's
 * record or events changed. The store stays the one source of what happened:
 * a change only wakes a stream, which then reads the store from where it was.
 * So a stream never misses or repeats an event, and a subscriber that falls
 * behind costs no memory here.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Store } from '../store/store.ts';

/** One stream's interest: the ids changed since it last looked. */
export class ChangeSubscription {
  readonly #pending = new Set<string>();
  #wake: (() => void) | undefined;
  readonly #unsubscribe: () => void;

  constructor(unsubscribe: () => void) {
    this.#unsubscribe = unsubscribe;
  }

  /** @internal from MigrationChanges */
  note(id: string): void {
    this.#pending.add(id);
    this.#wake?.();
  }

  /** Waits until a change is pending, `ms` passed or `signal` aborted; returns the ids changed (and forgets them). */
  async next(ms: number, signal: AbortSignal): Promise<string[]> {
    if (this.#pending.size === 0 && !signal.aborted) {
      const woken = new Promise<void>((resolve) => (this.#wake = resolve));
      const timer = new AbortController();
      const stop = AbortSignal.any([signal, timer.signal]);
      try {
        await Promise.race([woken, sleep(ms, undefined, { signal: stop }).catch(() => undefined)]);
      } finally {
        timer.abort();
        this.#wake = undefined;
      }
    }
    const ids = [...this.#pending];
    this.#pending.clear();
    return ids;
  }

  close(): void {
    this.#unsubscribe();
  }
}

export class MigrationChanges {
  readonly #subscriptions = new Set<ChangeSubscription>();

  /** Subscribe before reading the store, so a change made meanwhile is pending, not lost. */
  subscribe(): ChangeSubscription {
    const subscription: ChangeSubscription = new ChangeSubscription(() => this.#subscriptions.delete(subscription));
    this.#subscriptions.add(subscription);
    return subscription;
  }

  changed(id: string): void {
    for (const subscription of this.#subscriptions) subscription.note(id);
  }

  /** A host drain's status changed (drain.ts): noted under an id no migration has, for the all-migrations stream. */
  drainChanged(drainId: string): void {
    this.changed(`${drainPrefix}${drainId}`);
  }
}

const drainPrefix = 'drain:';

/** The drain a changed id names, if it names one (MigrationChanges.drainChanged). */
export function drainOfChange(id: string): string | undefined {
  return id.startsWith(drainPrefix) ? id.slice(drainPrefix.length) : undefined;
}

/**
 * The store, with every write to a migration announced once it is committed:
 * whoever writes (the migration's own run, the recovery of an unfinished or
 * unresolved one, a drain) is heard without knowing of the streams. A Proxy, so
 * methods the Store gains later pass through unchanged.
 */
export function announcingStore(store: Store, changes: MigrationChanges): Store {
  const announcing: Partial<Store> = {
    // A leader's fenced view writes the same migrations: its writes are heard too.
    fencedBy: (lease) => announcingStore(store.fencedBy(lease), changes),
    createMigration: async (record) => {
      await store.createMigration(record);
      changes.changed(record.id);
    },
    updateMigration: async (id, patch) => {
      await store.updateMigration(id, patch);
      changes.changed(id);
    },
    appendEvent: async (id, event) => {
      await store.appendEvent(id, event);
      changes.changed(id);
    },
  };
  return new Proxy(store, {
    get(target, property) {
      if (typeof property === 'string' && property in announcing) return announcing[property as keyof Store];
      const value: unknown = Reflect.get(target, property, target);
      // The engines keep #private fields: their methods must run on the engine itself, not on the proxy.
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
    },
  });
}

/**
 * Whether this controller may act. With a SQLite file it is the only one and
 * always leads, and its requests carry no epoch. With PostgreSQL it leads
 * while it holds the lease (leader-lease.ts): each tenure gets a signal that
 * aborts when the lease is lost, so what the tenure started stops at once,
 * and its requests to agents carry the tenure's epoch (src/agent/leader-epoch.ts).
 */
import type { Logger } from 'pino';
import { VmferryError } from '../errors.ts';
import type { EpochStamp } from '../agent/leader-epoch.ts';
import type { LeaseToken } from '../store/store.ts';
import { LeaderLease, type LeaseView } from './leader-lease.ts';

/** A tenure as leader: its epoch (none with a single controller), and a signal that aborts when it ends. */
export interface Tenure {
  epoch: number | undefined;
  /** The lease row this tenure holds, for a store that refuses its writes in the database once it is lost (none with a single controller). */
  lease: LeaseToken | undefined;
  signal: AbortSignal;
  /** Throws (VMF_NOT_LEADER) once this tenure is over, even before its signal fired: call it before each write. */
  check(): void;
  /** The epoch this tenure's requests to agents carry; refused once the tenure is over. */
  stamp: EpochStamp;
}

export interface LeadershipStatus {
  /** This controller's URL (its id in the lease), when it shares a database with others. */
  self: string | null;
  leader: boolean;
  /** The leading controller's URL, as last read; null with a single controller or before any controller led. */
  leaderUrl: string | null;
  epoch: number | null;
}

export interface Leadership extends EpochStamp {
  status(): LeadershipStatus;
  /** Throws VMF_NOT_LEADER, naming the leader, unless this controller leads. */
  requireLeader(): void;
  /** Calls `run` at the start of each tenure (at once for a single controller); `run` stops when the tenure's signal aborts. */
  onTenure(run: (tenure: Tenure) => void): void;
  stop(): Promise<void>;
}

/** The header a standby names the leader in, beside its VMF_NOT_LEADER error. */
export const leaderUrlHeader = 'vmferry-leader';

/** The controller with a SQLite file: alone, always leading, nothing to fence. */
export function soleLeadership(): Leadership {
  const forever = new AbortController();
  return {
    acting: () => undefined,
    reading: () => undefined,
    status: () => ({ self: null, leader: true, leaderUrl: null, epoch: null }),
    requireLeader: () => undefined,
    onTenure: (run) => run({ epoch: undefined, lease: undefined, signal: forever.signal, check: () => undefined, stamp: { acting: () => undefined, reading: () => undefined } }),
    stop: () => {
      forever.abort(new VmferryError('VMF_ABORTED', 'the controller is shutting down'));
      return Promise.resolve();
    },
  };
}

export interface SharedLeadershipOptions {
  /** This controller's URL: the one standbys name, so clients and agents reach the leader. */
  url: string;
  ttlMs: number;
  logger: Logger;
}

/** A controller sharing a PostgreSQL database with others: it leads while it holds the lease. */
export async function sharedLeadership(dbUrl: string, options: SharedLeadershipOptions): Promise<Leadership> {
  const runs: ((tenure: Tenure) => void)[] = [];
  let current: (Tenure & { abort: AbortController }) | undefined;
  const changed = (view: LeaseView): void => {
    if (current && (!view.leader || view.epoch !== current.epoch)) {
      // Lost (or renewed under a new epoch after a lapse): everything of the old tenure stops before the next starts.
      current.abort.abort(new VmferryError('VMF_NOT_LEADER', `this controller lost the leader lease (epoch ${current.epoch}); the leader is ${view.holder ?? 'not known yet'}`));
      current = undefined;
    }
    if (view.leader && !current && view.epoch !== null) {
      const epoch = view.epoch;
      const abort = new AbortController();
      const check = (): void => {
        if (abort.signal.aborted) throw abort.signal.reason;
        if (acting() !== epoch) throw notLeader();
      };
      const reading = (): number | undefined => (abort.signal.aborted || box.lease?.view().epoch !== epoch || !box.lease.view().leader ? undefined : epoch);
      current = {
        epoch,
        lease: { holder: options.url, epoch },
        signal: abort.signal,
        abort,
        check,
        stamp: {
          acting: () => {
            check();
            return epoch;
          },
          reading,
        },
      };
      for (const run of runs) run(current);
    }
  };
  // The lease reports its first attempt from inside start(), before it is assigned here.
  const box: { lease?: LeaderLease } = {};
  const lease = await LeaderLease.start(dbUrl, { id: options.url, ttlMs: options.ttlMs, logger: options.logger, onChange: changed });
  box.lease = lease;
  function notLeader(): VmferryError {
    const holder = box.lease?.view().holder;
    const leader = holder && holder !== options.url ? holder : null;
    return new VmferryError(
      'VMF_NOT_LEADER',
      `this controller (${options.url}) is a standby: ${leader ? `the leader is ${leader}; send the request there (its URL is also in the ${leaderUrlHeader} header)` : 'no controller holds the leader lease yet; try again in a few seconds'}`,
    );
  }
  function acting(): number {
    const view = box.lease?.view();
    // Checked at each request: a lease that lapsed while the process was paused is noticed here, before anything is sent.
    if (!view?.leader || view.epoch === null || current?.epoch !== view.epoch) throw notLeader();
    return view.epoch;
  }
  return {
    acting,
    reading: () => {
      const view = lease.view();
      return view.leader && view.epoch !== null ? view.epoch : undefined;
    },
    status: () => {
      const view = lease.view();
      return { self: options.url, leader: view.leader, leaderUrl: view.holder, epoch: view.epoch };
    },
    requireLeader: () => {
      acting();
    },
    onTenure: (run) => {
      runs.push(run);
      if (current) run(current);
    },
    stop: async () => {
      await lease.stop();
    },
  };
}

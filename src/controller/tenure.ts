/**
 * What a controller does while it leads: at each new tenure it tells every
 * host its epoch (so a leader that lost the lease is refused by every agent,
 * not only by those the new one has reached), then settles the migrations a
 * previous leader left unfinished by the rules of recovery.ts, and takes new
 * migrations. Every store write and agent request of a tenure checks that the
 * tenure still holds first, and PostgreSQL checks each write against the lease
 * row in the write's own transaction: a former leader writes and sends nothing.
 */
import type { Logger } from 'pino';
import { describeError } from '../errors.ts';
import type { Store } from '../store/store.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import { Inventory } from './inventory.ts';
import type { Leadership, Tenure } from './leadership.ts';
import type { MigrationService } from './migrations.ts';
import { settleUnfinishedMigrations } from './recovery.ts';

/** How long a host may take to hear of a new epoch before the tenure goes on without it. */
const announceTimeoutMs = 3_000;

/** `store` whose writes of migrations and VM locations are refused once `check` throws; host heartbeats are any controller's to record. */
export function fencedStore(store: Store, check: () => void): Store {
  const fenced = <A extends unknown[], R>(write: (...args: A) => Promise<R>) => async (...args: A): Promise<R> => {
    check();
    return write(...args);
  };
  return {
    fencedBy: (lease) => fencedStore(store.fencedBy(lease), check),
    upsertHost: (host) => store.upsertHost(host),
    listHosts: () => store.listHosts(),
    getHost: (id) => store.getHost(id),
    setHostDraining: fenced((id, draining) => store.setHostDraining(id, draining)),
    drainingHosts: () => store.drainingHosts(),
    saveDrain: fenced((drain) => store.saveDrain(drain)),
    getDrain: (id) => store.getDrain(id),
    listDrains: (limit) => store.listDrains(limit),
    setVmLocation: fenced((location) => store.setVmLocation(location)),
    getVmLocation: (name) => store.getVmLocation(name),
    deleteVmLocation: fenced((name) => store.deleteVmLocation(name)),
    createMigration: fenced((record) => store.createMigration(record)),
    updateMigration: fenced((id, patch) => store.updateMigration(id, patch)),
    getMigration: (id) => store.getMigration(id),
    listMigrations: (limit) => store.listMigrations(limit),
    activeMigration: (vm) => store.activeMigration(vm),
    unfinishedMigrations: () => store.unfinishedMigrations(),
    appendEvent: fenced((id, event) => store.appendEvent(id, event)),
    eventsSince: (id, after) => store.eventsSince(id, after),
    close: () => store.close(),
  };
}

export interface TenureOptions {
  leadership: Leadership;
  store: Store;
  tls: TlsIdentity | undefined;
  migrations: MigrationService;
  logger: Logger;
}

/** Runs every tenure of this controller; the promise returned by `stopped()` resolves once the last one's work has ended. */
export function runTenures(options: TenureOptions): { stopped(): Promise<void> } {
  const work = new Set<Promise<void>>();
  options.leadership.onTenure((tenure) => {
    const done = lead(tenure, options).finally(() => work.delete(done));
    work.add(done);
  });
  return { stopped: async () => void (await Promise.all(work)) };
}

async function lead(tenure: Tenure, { store, tls, migrations, logger }: TenureOptions): Promise<void> {
  // Checked here before each write, and by the database inside it: a leader paused in between is refused there.
  const tenureStore = fencedStore(tenure.lease ? store.fencedBy(tenure.lease) : store, () => tenure.check());
  const inventory = new Inventory(tenureStore, tls, tenure.stamp);
  // The previous tenure's migrations stop by themselves (their requests are refused); settling them waits until they have.
  await migrations.idle();
  if (tenure.signal.aborted) return;
  migrations.lead({ store: tenureStore, inventory, signal: tenure.signal });
  if (tenure.epoch !== undefined) await announce(inventory, tenure, logger);
  const why = tenure.epoch === undefined ? 'the controller restarted' : `a new leader took over (epoch ${tenure.epoch})`;
  await settleUnfinishedMigrations(tenureStore, inventory, logger, tenure.signal, why);
}

/** Every reachable host hears the new epoch at once (any request carries it), so none still obeys the former leader. */
async function announce(inventory: Inventory, tenure: Tenure, logger: Logger): Promise<void> {
  const hosts = await inventory.hosts().catch(() => []);
  await Promise.all(
    hosts
      .filter((h) => h.state === 'reachable')
      .map(async (host) => {
        try {
          await (await inventory.agent(host.id)).host(AbortSignal.any([tenure.signal, AbortSignal.timeout(announceTimeoutMs)]));
        } catch (err) {
          logger.warn({ err: describeError(err), host: host.id }, `host ${host.id} did not hear of leader epoch ${tenure.epoch} yet; it will with the next request`);
        }
      }),
  );
}

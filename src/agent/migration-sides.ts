/**
 * The halves of migrations this host takes part in, by migration id. The
 * controller drives them over HTTP; each half is the same QemuSource or
 * QemuDestination the in-process tests use. A finished half updates the VM
 * registry: the destination adopts the migrated guest, the source forgets it.
 */
import type { Logger } from 'pino';
import { VmferryError } from '../errors.ts';
import { probeDestination, probeSource, qemuCapabilities, type QemuCapabilities } from '../migration/probe.ts';
import type { DestinationFacts, MigrationPlan, SourceFacts } from '../migration/plan.ts';
import { QemuDestination } from '../migration/qemu-destination.ts';
import { QemuSource } from '../migration/qemu-source.ts';
import type { VmSpec } from '../qemu/spec.ts';
import type { PreparedDestination } from '../migration/sides.ts';
import type { VmRegistry } from './vm-registry.ts';

interface SourceHalf {
  vm: string;
  side: QemuSource;
}

export class MigrationSides {
  readonly #registry: VmRegistry;
  readonly #address: string;
  readonly #logger: Logger;
  readonly #sources = new Map<string, SourceHalf>();
  readonly #destinations = new Map<string, QemuDestination>();
  #qemu: QemuCapabilities | undefined;

  constructor(registry: VmRegistry, address: string, logger: Logger) {
    this.#registry = registry;
    this.#address = address;
    this.#logger = logger;
  }

  async capabilities(): Promise<QemuCapabilities> {
    this.#qemu ??= await qemuCapabilities();
    return this.#qemu;
  }

  async probeSource(vm: string): Promise<SourceFacts> {
    return probeSource(this.#registry.hostId, this.#registry.running(vm), await this.capabilities());
  }

  async probeDestination(spec: VmSpec): Promise<DestinationFacts> {
    return probeDestination(this.#registry.hostId, spec, this.#registry.pool, this.#registry.names(), await this.capabilities());
  }

  /** Binds a migration id to a running VM on this host, as its source. */
  beginSource(id: string, vm: string): void {
    if (this.#sources.has(id)) return;
    this.#registry.setMigrating(vm, true);
    const side = new QemuSource({ hostId: this.#registry.hostId, vm: this.#registry.running(vm), logger: this.#logger.child({ migration: id }) });
    this.#sources.set(id, { vm, side });
  }

  source(id: string): QemuSource {
    return this.#requireSource(id).side;
  }

  async prepareDestination(id: string, spec: VmSpec, plan: MigrationPlan, signal: AbortSignal): Promise<PreparedDestination> {
    if (this.#destinations.has(id)) throw new VmferryError('VMF_CONFLICT', `migration ${id} is already prepared on ${this.#registry.hostId}`);
    const destination = new QemuDestination({
      hostId: this.#registry.hostId,
      pool: this.#registry.pool,
      vmDir: (name) => this.#registry.vmDir(name),
      address: this.#address,
      ...(this.#registry.fence ? { fence: this.#registry.fence } : {}),
      logger: this.#logger.child({ migration: id }),
    });
    this.#destinations.set(id, destination);
    return destination.prepare(spec, plan, signal);
  }

  destination(id: string): QemuDestination {
    const destination = this.#destinations.get(id);
    if (!destination) throw new VmferryError('VMF_NOT_FOUND', `migration ${id} has no destination on ${this.#registry.hostId}`);
    return destination;
  }

  /** What this host holds of migration `id`, for a controller settling it after a restart. */
  describe(id: string): { source: { vm: string } | null; destination: { state: QemuDestination['state'] } | null } {
    const source = this.#sources.get(id);
    const destination = this.#destinations.get(id);
    return { source: source ? { vm: source.vm } : null, destination: destination ? { state: destination.state } : null };
  }

  async resumeDestination(id: string, signal: AbortSignal): Promise<void> {
    const destination = this.destination(id);
    await destination.resume(signal);
    if (destination.vm) await this.#registry.adoptMigrated(destination.vm);
    this.#destinations.delete(id);
  }

  async rollbackDestination(id: string): Promise<void> {
    // Idempotent: a rollback of a migration this host never prepared is nothing to do.
    const destination = this.#destinations.get(id);
    if (!destination) return;
    await destination.rollback();
    this.#destinations.delete(id);
  }

  async retireSource(id: string, keepLocalDisks: boolean): Promise<void> {
    const half = this.#requireSource(id);
    await half.side.retire(keepLocalDisks);
    await this.#registry.forgetMigrated(half.vm);
    this.#sources.delete(id);
  }

  async rollbackSource(id: string): Promise<void> {
    const half = this.#sources.get(id);
    if (!half) return;
    try {
      await half.side.rollback();
    } finally {
      // Even a rollback that failed half-way hands the VM back: its owner must be able to stop or inspect it.
      this.#registry.setMigrating(half.vm, false);
      this.#sources.delete(id);
    }
  }

  #requireSource(id: string): SourceHalf {
    const half = this.#sources.get(id);
    if (!half) throw new VmferryError('VMF_NOT_FOUND', `migration ${id} has no source on ${this.#registry.hostId}`);
    return half;
  }
}

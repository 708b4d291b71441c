/**
 * The VMs of one host: their specs persisted in the agent's data directory,
 * their QEMU processes started, stopped, and re-adopted when the agent
 * restarts (an agent restart never kills a guest).
 *
 *   DATA/pool/                 local disk images
 *   DATA/vms/NAME/spec.json    the VM's spec (with this host's paths)
 *   DATA/vms/NAME/serialN.log  serial port logs
 *   DATA/vms/NAME/qemu/        QMP socket, pidfile, QEMU's own log
 *   DATA/quarantine/           what start-up could not account for (quarantine.ts)
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import type { Logger } from 'pino';
import { VmferryError, describeError } from '../errors.ts';
import type { HostAccelerator } from '../qemu/accel.ts';
import { defaultCpuModel } from '../qemu/cpu-models.ts';
import { QemuProcess, killOrphanQemu } from '../qemu/process.ts';
import { validateVmSpec, type BootSpec, type DiskSource, type DiskSpec, type NicSpec, type VmSpec } from '../qemu/spec.ts';
import { existingBridges, removeTapsOf } from '../qemu/taps.ts';
import { createOverlay, importImage } from '../storage/disk-images.ts';
import { LocalPool } from '../storage/local-pool.ts';
import type { SharedWriterFence } from '../storage/writer-fence.ts';
import { fenceAllWriters } from '../storage/rbd-fence.ts';
import type { CreateVmRequest, QuarantineEntry, VmInfo } from '../api/agent-types.ts';
import type { DestinationFate } from '../migration/no-return.ts';
import { guestNeverRan } from '../migration/qemu-destination.ts';
import { fsyncDir, fsyncFile, mkdirDurable, removeDurable, renameDurable, writeFileDurable } from '../util/durable-file.ts';
import { readIncomingRecord, writeIncomingRecord, type IncomingRecord } from './half-records.ts';
import type { IoErrorCandidate } from './io-error-resume.ts';
import { Quarantine } from './quarantine.ts';
import type { RequestGuard } from './request-guard.ts';

type LocalDiskRequest = NonNullable<CreateVmRequest['disks'][number]['local']>;

interface VmEntry {
  spec: VmSpec;
  qemu: QemuProcess | undefined;
  /** Set while a migration uses this VM; start/stop/delete are refused meanwhile. */
  migrating: boolean;
}

/**
 * What a destination half's durable record says once no QEMU of it is alive:
 * a resume may have reached the QEMU that died after `resume-sent`, and with
 * it (and its agent) gone nothing can tell whether it ran the guest.
 */
function fateOfRecord(phase: IncomingRecord['phase'] | undefined): DestinationFate {
  if (phase === 'resumed') return 'guest-ran';
  return phase === 'resume-sent' ? 'unknown' : 'gone';
}

/** A locally administered unicast MAC under QEMU's and libvirt's 52:54:00 prefix. */
function generateMac(): string {
  return ['52', '54', '00', ...[...randomBytes(3)].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

export class VmRegistry {
  readonly hostId: string;
  readonly pool: LocalPool;
  /** The one-writer fence of shared volumes, when the agent knows the storage server's admin API. */
  readonly fence: SharedWriterFence | undefined;
  readonly quarantine: Quarantine;
  /** What runs this host's guests: every QEMU this agent starts, a VM's or a migration's destination, uses it. */
  readonly accelerator: HostAccelerator;
  /** The agent's TLS identity in QEMU's layout, when it has one: every QEMU it starts gets it. */
  readonly qemuTlsDir: string | undefined;
  /** What a request may make this host open (request-guard.ts): checked before anything is created or started. */
  readonly guard: RequestGuard;
  readonly #dataDir: string;
  readonly #logger: Logger;
  readonly #vms = new Map<string, VmEntry>();

  constructor(hostId: string, dataDir: string, logger: Logger, accelerator: HostAccelerator, guard: RequestGuard, fence?: SharedWriterFence, qemuTlsDir?: string) {
    this.hostId = hostId;
    this.guard = guard;
    this.qemuTlsDir = qemuTlsDir;
    this.accelerator = accelerator;
    this.fence = fence;
    this.#dataDir = dataDir;
    this.#logger = logger;
    this.pool = new LocalPool(join(dataDir, 'pool'));
    this.quarantine = new Quarantine(dataDir);
  }

  vmDir(name: string): string {
    return join(this.#dataDir, 'vms', name);
  }

  /** Creates a VM's directory durably (its entry and its parents'), for records a restart must find. */
  async makeVmDir(name: string): Promise<string> {
    const dir = this.vmDir(name);
    await mkdirDurable(dir, this.#dataDir);
    return dir;
  }

  /**
   * Loads persisted VMs and re-adopts the QEMUs still running. A VM directory
   * without a valid spec never stops the agent: it is settled (below) once
   * every valid VM is loaded, so their images are known to be in use.
   */
  async init(): Promise<void> {
    await mkdir(this.pool.dir, { recursive: true });
    await mkdir(join(this.#dataDir, 'vms'), { recursive: true });
    // What an earlier process was removing when it died: already no VM, so finished first.
    for (const name of await readdir(this.#trashDir).catch(() => [])) await removeDurable(join(this.#trashDir, name));
    const unreadable: { name: string; problem: string }[] = [];
    for (const name of await readdir(join(this.#dataDir, 'vms'))) {
      const loaded = await this.#readSpec(name);
      if ('problem' in loaded) unreadable.push({ name, problem: loaded.problem });
      else await this.#load(loaded.spec);
    }
    for (const { name, problem } of unreadable) await this.#settleInterruptedIncoming(name, problem);
  }

  /** The spec in vms/NAME/spec.json, or what is wrong with it. */
  async #readSpec(name: string): Promise<{ spec: VmSpec } | { problem: string }> {
    let text: string;
    try {
      text = await readFile(join(this.vmDir(name), 'spec.json'), 'utf8');
    } catch (err) {
      return { problem: (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no spec.json' : `spec.json unreadable: ${(err as Error).message}` };
    }
    try {
      const spec = validateVmSpec(JSON.parse(text));
      return spec.name === name ? { spec } : { problem: `spec.json names VM ${spec.name}` };
    } catch (err) {
      return { problem: text.trim() === '' ? 'spec.json is empty' : `spec.json is invalid: ${(err as Error).message}` };
    }
  }

  async #load(spec: VmSpec): Promise<void> {
    const qemu = await QemuProcess.adopt(spec, join(this.vmDir(spec.name), 'qemu'), this.#logger);
    // Its QEMU died while no agent watched: nothing else cleaned up its taps.
    if (!qemu && spec.nics?.length) await this.#removeTaps(spec.name);
    this.#vms.set(spec.name, { spec, qemu, migrating: false });
    this.#logger.info({ vm: spec.name, running: qemu !== undefined }, qemu ? 're-adopted running VM' : 'loaded stopped VM');
  }

  /**
   * The one place that decides what happens to a VM directory without a valid
   * spec. It is most likely the destination half of a migration that never
   * finished (the spec is written only when the guest is adopted), but that is
   * a guess, and its images may be the only copy of a disk: its QEMU, if the
   * agent died and left it, is killed, and its directory and the pool images
   * named after it that no loaded VM uses are moved to the quarantine, where a
   * person can restore or purge them. Nothing is deleted here.
   */
  async #settleInterruptedIncoming(name: string, problem: string): Promise<void> {
    if (await this.#takeOverResumedIncoming(name)) return;
    const killedPid = await killOrphanQemu(join(this.vmDir(name), 'qemu'));
    // No VM of this name is loaded here, so no tap of that name belongs to anything.
    await this.#removeTaps(name);
    const inUse = new Set([...this.#vms.values()].flatMap((e) => e.spec.disks.flatMap((d) => (d.source.kind === 'file' ? [d.source.path] : []))));
    const images = (await readdir(this.pool.dir)).filter((file) => file.startsWith(`${name}-`) && !inUse.has(join(this.pool.dir, file)));
    const reason = `at agent start, VM directory ${name} had ${problem}${killedPid === undefined ? '' : ` (its QEMU, pid ${killedPid}, was killed)`}`;
    try {
      const entry = await this.quarantine.hold(name, reason, [
        { kind: 'vm-dir', path: this.vmDir(name) },
        ...images.map((file) => ({ kind: 'pool-image' as const, path: join(this.pool.dir, file) })),
      ]);
      this.#logger.warn({ vm: name, killedPid, quarantine: entry.id, images }, `${reason}: moved to quarantine ${entry.id}`);
    } catch (err) {
      // Left where they are: the next start looks at them again.
      this.#logger.error({ err, vm: name, killedPid, images }, `${reason}: could not move it to the quarantine`);
    }
  }

  /**
   * The destination half of a migration whose resume may have reached its
   * QEMU (incoming.json says so, written before the cont): a QEMU of it still
   * alive runs the guest, or may be asked to, so it becomes this host's VM
   * again instead of being killed. Whether the guest ran is then for the
   * controller to ask (incomingFate) and settle by no-return.ts; a QEMU that
   * never ran it is held as migrating until then.
   */
  async #takeOverResumedIncoming(name: string): Promise<boolean> {
    const record = await readIncomingRecord(this.vmDir(name));
    if (!record?.spec || record.phase === 'prepared') return false;
    let spec: VmSpec;
    try {
      spec = validateVmSpec(record.spec);
    } catch {
      return false;
    }
    if (spec.name !== name) return false;
    const qemu = await QemuProcess.adopt(spec, join(this.vmDir(name), 'qemu'), this.#logger);
    if (!qemu) return false;
    const ran = !guestNeverRan(await qemu.status());
    await this.#persist(spec);
    // Said durably now: should this QEMU die later, its record still answers that the guest ran here.
    if (ran) await writeIncomingRecord(this.vmDir(name), { migration: record.migration, phase: 'resumed', spec });
    this.#vms.set(name, { spec, qemu, migrating: !ran });
    this.#logger.warn({ vm: name, migration: record.migration, guestRan: ran }, `took over the QEMU of migration ${record.migration}, which was ${record.phase} here`);
    return true;
  }

  /**
   * Puts a quarantine entry back; a VM whose directory comes back with a valid
   * spec (repaired in the quarantine before the restore) is loaded at once.
   */
  async restoreQuarantined(id: string): Promise<QuarantineEntry> {
    const entry = await this.quarantine.restore(id);
    if (entry.items.some((item) => item.kind === 'vm-dir') && !this.#vms.has(entry.vm)) {
      const loaded = await this.#readSpec(entry.vm);
      if ('spec' in loaded) await this.#load(loaded.spec);
      else this.#logger.warn({ vm: entry.vm, problem: loaded.problem }, `restored VM directory ${entry.vm} has ${loaded.problem}: not loaded; the next agent start moves it to the quarantine again`);
    }
    return entry;
  }

  list(): Promise<VmInfo[]> {
    return Promise.all([...this.#vms.keys()].sort().map((name) => this.info(name)));
  }

  names(): string[] {
    return [...this.#vms.keys()];
  }

  async info(name: string): Promise<VmInfo> {
    const entry = this.#require(name);
    let state: VmInfo['state'] = 'stopped';
    let blockJobs: string[] = [];
    const qemu = entry.qemu;
    if (qemu?.isAlive) {
      const status = await qemu.status().catch(() => undefined);
      state = status?.running ? 'running' : 'paused';
      blockJobs = await qemu.qmp('listing block jobs', (qmp) => qmp.queryBlockJobs()).then(
        (jobs) => jobs.map((job) => job.device),
        () => [],
      );
    }
    return { name, host: this.hostId, state, pid: qemu?.isAlive ? qemu.pid : null, migrating: entry.migrating, blockJobs, spec: entry.spec };
  }

  /** The running QEMU of a VM, for the source side of a migration. */
  running(name: string): QemuProcess {
    const qemu = this.#require(name).qemu;
    if (!qemu?.isAlive) throw new VmferryError('VMF_CONFLICT', `VM ${name} is not running on ${this.hostId}`);
    return qemu;
  }

  /** The live QEMU of a VM, if it has one. */
  runningOrUndefined(name: string): QemuProcess | undefined {
    const qemu = this.#vms.get(name)?.qemu;
    return qemu?.isAlive ? qemu : undefined;
  }

  /** VMs whose QEMU runs here in no migration: the ones io-error-resume.ts may continue. */
  vmsOutsideMigrations(): IoErrorCandidate[] {
    return [...this.#vms.entries()].flatMap(([name, entry]) =>
      entry.qemu?.isAlive && !entry.migrating ? [{ name, qemu: entry.qemu, spec: entry.spec, free: () => this.#vms.get(name) === entry && !entry.migrating }] : [],
    );
  }

  setMigrating(name: string, migrating: boolean): void {
    const entry = this.#require(name);
    if (migrating && entry.migrating) throw new VmferryError('VMF_CONFLICT', `VM ${name} is already migrating`);
    entry.migrating = migrating;
  }

  async create(request: CreateVmRequest): Promise<VmInfo> {
    if (this.#vms.has(request.name)) throw new VmferryError('VMF_CONFLICT', `VM ${request.name} already exists on ${this.hostId}`);
    const vmDir = this.vmDir(request.name);
    // Before anything is imported or created: a request that names what this host does not allow leaves nothing behind.
    const boot: BootSpec = request.boot;
    await this.guard.boot(boot);
    for (const disk of request.disks) {
      if (disk.local?.import !== undefined) await this.guard.importFile(disk.local.import, `disks.${disk.id}.local.import`);
      if (disk.local?.baseServer) this.guard.storageServer(disk.local.baseServer, `disks.${disk.id}.local.baseServer`);
      if (disk.shared) this.guard.storageServer(disk.shared.server, `disks.${disk.id}.shared.server`);
    }
    const disks: DiskSpec[] = [];
    const created: string[] = [];
    try {
      for (const disk of request.disks) {
        if (disk.local) {
          const { volume, source } = await this.#createLocalDisk(request.name, disk.id, disk.local);
          created.push(volume);
          disks.push({ id: disk.id, source, readOnly: disk.readOnly ?? false, cache: disk.cache ?? 'none' });
        } else if (disk.shared) {
          disks.push({ id: disk.id, source: { kind: 'nbd', server: disk.shared.server, export: disk.shared.export }, readOnly: disk.readOnly ?? false, cache: disk.cache ?? 'none' });
        } else if (disk.rbd) {
          await this.guard.hostFile(disk.rbd.conf, `disks.${disk.id}.rbd.conf`);
          disks.push({ id: disk.id, source: { kind: 'rbd', ...disk.rbd }, readOnly: disk.readOnly ?? false, cache: disk.cache ?? 'none' });
        } else {
          throw new VmferryError('VMF_INVALID_SPEC', `invalid VM spec: disks.${disk.id} needs "local", "shared" or "rbd"`);
        }
      }
      const nics: NicSpec[] = (request.nics ?? []).map((nic, i) => ({ id: `net${i}`, bridge: nic.bridge, mac: nic.mac?.toLowerCase() ?? generateMac() }));
      const bridges = await existingBridges(nics.map((nic) => nic.bridge));
      const missing = nics.find((nic) => !bridges.includes(nic.bridge));
      if (missing) throw new VmferryError('VMF_NETWORK', `NIC ${missing.id} of VM ${request.name}: ${this.hostId} has no bridge ${missing.bridge}`);
      const serialPorts = request.serialPorts ?? 1;
      const spec = validateVmSpec({
        name: request.name,
        vcpus: request.vcpus ?? 1,
        memoryMiB: request.memoryMiB ?? 256,
        ...(request.machine ? { machine: request.machine } : {}),
        cpu: request.cpu ?? defaultCpuModel,
        boot,
        disks,
        ...(nics.length ? { nics } : {}),
        serialLogs: Array.from({ length: serialPorts }, (_, i) => join(vmDir, `serial${i}.log`)),
      });
      await this.#persist(spec);
      this.#vms.set(spec.name, { spec, qemu: undefined, migrating: false });
      return await this.info(spec.name);
    } catch (err) {
      for (const volume of created) await this.pool.remove(volume);
      await rm(vmDir, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * A new VM's local disk in the pool: empty, imported from an image file, or
   * an overlay on a shared base. Each fails without leaving an image behind.
   */
  async #createLocalDisk(vm: string, id: string, local: LocalDiskRequest): Promise<{ volume: string; source: DiskSource }> {
    const invalid = (problem: string): VmferryError => new VmferryError('VMF_INVALID_SPEC', `invalid VM spec: disks.${id}.local ${problem}`);
    if (local.import !== undefined && local.base !== undefined) throw invalid('takes "import" or "base", not both');
    if (local.import !== undefined) {
      if (local.sizeBytes !== undefined) throw invalid('takes no "sizeBytes" with "import": the disk has the image\'s size');
      const format = local.format ?? 'qcow2';
      const volume = `${vm}-${id}.${format}`;
      return { volume, source: { kind: 'file', path: await importImage(this.pool, volume, local.import, format), format } };
    }
    if (local.base !== undefined) {
      if (!local.baseServer) throw invalid('needs "baseServer" with "base": the NBD address of the storage server that has the volume');
      if (local.format === 'raw') throw invalid('takes no "format": "raw" with "base": an overlay is a qcow2 image');
      const backing = { server: local.baseServer, export: local.base };
      const volume = `${vm}-${id}.qcow2`;
      const path = await createOverlay(this.pool, volume, backing, {
        ...(local.sizeBytes === undefined ? {} : { sizeBytes: local.sizeBytes }),
        probe: true,
        ...(this.qemuTlsDir === undefined ? {} : { tlsDir: this.qemuTlsDir }),
      });
      return { volume, source: { kind: 'file', path, format: 'qcow2', backing } };
    }
    if (local.sizeBytes === undefined) throw invalid('needs "sizeBytes" (an empty disk), "import" (an image file) or "base" (an overlay on a shared volume)');
    const format = local.format ?? 'qcow2';
    const volume = `${vm}-${id}.${format}`;
    return { volume, source: { kind: 'file', path: await this.pool.create(volume, format, local.sizeBytes), format } };
  }

  async start(name: string): Promise<VmInfo> {
    const entry = this.#idle(name);
    if (entry.qemu?.isAlive) throw new VmferryError('VMF_CONFLICT', `VM ${name} is already running on ${this.hostId}`);
    // Its spec was checked when it came, but the operator may have trusted less since.
    await this.guard.spec(entry.spec);
    if (this.fence) {
      // A new QEMU instance, new writer tokens: whatever ran this VM before, here or elsewhere, can no longer write.
      const spec = await this.fence.tokenize(entry.spec);
      await this.fence.claim(spec);
      await this.#persist(spec);
      entry.spec = spec;
    }
    // Likewise for RBD images: whoever has them open now is an earlier writer, cut off before this QEMU opens them.
    await fenceAllWriters(entry.spec, this.#logger);
    entry.qemu = await QemuProcess.start(entry.spec, { runDir: join(this.vmDir(name), 'qemu'), accel: this.accelerator.accelerator, logger: this.#logger, ...(this.qemuTlsDir === undefined ? {} : { tlsDir: this.qemuTlsDir }) });
    return this.info(name);
  }

  async stop(name: string, force = false): Promise<VmInfo> {
    const entry = this.#idle(name);
    if (entry.qemu) {
      if (force) await entry.qemu.kill();
      else await entry.qemu.stop({ guestTimeoutMs: 10_000 });
      await entry.qemu.cleanup();
      entry.qemu = undefined;
    }
    return this.info(name);
  }

  async remove(name: string): Promise<void> {
    const entry = this.#idle(name);
    if (entry.qemu?.isAlive) throw new VmferryError('VMF_CONFLICT', `VM ${name} is running on ${this.hostId}; stop it first`);
    for (const disk of entry.spec.disks) {
      if (disk.source.kind === 'file' && disk.source.path.startsWith(this.pool.dir)) await removeDurable(disk.source.path);
    }
    await this.#removeVmDir(name);
    this.#vms.delete(name);
  }

  /** After a migration into this host: the destination QEMU becomes this host's VM. */
  async adoptMigrated(qemu: QemuProcess): Promise<void> {
    // The source deletes its copies once this returns: the images here, their entries in the pool and the spec must survive a power cut.
    const images = qemu.spec.disks.flatMap((d) => (d.source.kind === 'file' && dirname(d.source.path) === this.pool.dir ? [d.source.path] : []));
    for (const image of images) await fsyncFile(image);
    if (images.length) await fsyncDir(this.pool.dir);
    await this.#persist(qemu.spec);
    this.#vms.set(qemu.spec.name, { spec: qemu.spec, qemu, migrating: false });
  }

  /**
   * Whether the guest of migration `id` ran here, for a migration half this
   * agent process no longer holds (it restarted, or the half ended): only the
   * durable record beside a VM and its QEMU's live state answer.
   */
  async incomingFate(id: string): Promise<DestinationFate> {
    const found = await this.#incoming(id);
    if (!found) return fateOfRecord((await this.#heldIncoming(id))?.record.phase);
    if (found.phase === 'resumed') return 'guest-ran';
    const status = await found.entry.qemu?.statusUnlessExited();
    if (status) return guestNeverRan(status) ? 'never-ran' : 'guest-ran';
    return fateOfRecord(found.phase);
  }

  /**
   * An operator's choice for migration `id`, whose guest may or may not have
   * run here (incomingFate 'unknown'): it lives here now, as a stopped VM
   * with the disks its QEMU had, taken back from the quarantine (where an
   * agent restart put them) or from its directory. Refused while a QEMU of it
   * is alive: then its own state says whether the guest ran, and the
   * controller settles it.
   */
  async takeBackIncoming(id: string): Promise<VmInfo> {
    const found = await this.#incoming(id);
    if (found) {
      const name = found.entry.spec.name;
      if (found.entry.qemu?.isAlive) throw new VmferryError('VMF_CONFLICT', `the QEMU of migration ${id} is alive on ${this.hostId}: it says itself whether the guest ran, and vmferry settles the migration by it`);
      await writeIncomingRecord(this.vmDir(name), { migration: id, phase: 'resumed', spec: found.entry.spec });
      found.entry.migrating = false;
      return this.info(name);
    }
    const held = await this.#heldIncoming(id);
    if (!held) throw new VmferryError('VMF_NOT_FOUND', `${this.hostId} holds nothing of migration ${id}: no VM directory and no quarantine entry with its record`);
    // Before the resume the disks here may still have been catching up with the source's: never a VM of their own.
    if (held.record.phase === 'prepared' || !held.record.spec) throw new VmferryError('VMF_CONFLICT', `migration ${id} was never resumed on ${this.hostId}: its disks in quarantine ${held.entry.id} may be incomplete copies`);
    const spec = validateVmSpec(held.record.spec);
    if (this.#vms.has(spec.name)) throw new VmferryError('VMF_CONFLICT', `${this.hostId} already has a VM named ${spec.name}; move it away before taking back migration ${id}'s`);
    // Repaired in the quarantine, so that the restore loads it: the spec its QEMU ran with, and the record that the guest lives here.
    await writeFileDurable(join(held.dir, 'spec.json'), JSON.stringify(spec, null, 2));
    await writeIncomingRecord(held.dir, { migration: id, phase: 'resumed', spec });
    await this.restoreQuarantined(held.entry.id);
    this.#logger.warn({ vm: spec.name, migration: id, quarantine: held.entry.id }, `took back VM ${spec.name} of migration ${id} from quarantine ${held.entry.id}: an operator chose this host`);
    return this.info(spec.name);
  }

  /** The quarantined directory of migration `id`'s destination half (an agent start moved it there), with its record. */
  async #heldIncoming(id: string): Promise<{ entry: QuarantineEntry; dir: string; record: IncomingRecord } | undefined> {
    for (const held of await this.quarantine.heldVmDirs()) {
      const record = await readIncomingRecord(held.dir);
      if (record?.migration === id) return { ...held, record };
    }
    return undefined;
  }

  /**
   * Rolls back the destination half of migration `id` that a restarted agent
   * took over from its durable record: refused once the guest ran here; a
   * QEMU that never ran it is killed and its disks, copies of the source's,
   * are removed.
   */
  async rollbackIncoming(id: string): Promise<void> {
    const found = await this.#incoming(id);
    if (!found) return;
    const fate = await this.incomingFate(id);
    if (fate === 'guest-ran') throw new VmferryError('VMF_CONFLICT', `the guest of migration ${id} already ran on ${this.hostId}; refusing to roll back`);
    const name = found.entry.spec.name;
    if (found.entry.qemu) {
      await found.entry.qemu.kill();
      await found.entry.qemu.cleanup();
      found.entry.qemu = undefined;
    }
    // Its lease, if its resume got as far as claiming, goes with it: the source claims its own before it runs again.
    await this.fence?.release(found.entry.spec);
    if (fate === 'never-ran') {
      this.#vms.set(name, { ...found.entry, migrating: false });
      await this.remove(name);
      return;
    }
    // Its QEMU died without a word: whether it ran the guest is unknown, so its disks are kept, not deleted.
    const images = found.entry.spec.disks.flatMap((d) => (d.source.kind === 'file' && d.source.path.startsWith(this.pool.dir) ? [d.source.path] : []));
    const why = fate === 'unknown' ? 'an operator chose the source for' : 'vmferry rolled back';
    await this.quarantine.hold(name, `${why} migration ${id}, after this host's QEMU of it died during its resume`, [
      { kind: 'vm-dir', path: this.vmDir(name) },
      ...images.map((path) => ({ kind: 'pool-image' as const, path })),
    ]);
    this.#vms.delete(name);
  }

  async #incoming(id: string): Promise<{ entry: VmEntry; phase: 'prepared' | 'resume-sent' | 'resumed' } | undefined> {
    for (const [name, entry] of this.#vms) {
      const record = await readIncomingRecord(this.vmDir(name));
      if (record?.migration === id) return { entry, phase: record.phase };
    }
    return undefined;
  }

  /**
   * A retired source whose guest an operator chose to keep on the other host (resolve --run-on): its writable disks
   * in the pool are an older state of the guest that someone may still have to compare or recover from. Moved to
   * the quarantine, they are listed, restorable and purgeable there instead of lying in the pool as nobody's.
   * Disks outside the pool stay where they are. Returns the entry's id, if anything was moved.
   */
  async holdRetiredDisks(spec: VmSpec, reason: string): Promise<string | undefined> {
    const inPool = spec.disks.flatMap((d) => (d.source.kind === 'file' && !d.readOnly && dirname(resolve(d.source.path)) === resolve(this.pool.dir) ? [d.source.path] : []));
    const present = (await Promise.all(inPool.map(async (path) => ((await lstat(path).catch(() => undefined)) ? path : undefined)))).filter((p) => p !== undefined);
    if (present.length === 0) return undefined;
    const entry = await this.quarantine.hold(spec.name, reason, present.map((path) => ({ kind: 'pool-image' as const, path })));
    this.#logger.warn({ vm: spec.name, quarantine: entry.id, images: present }, `${reason}: moved to quarantine ${entry.id}`);
    return entry.id;
  }

  /** After a migration away from this host: the VM (whose QEMU has quit) is no longer ours. */
  async forgetMigrated(name: string): Promise<void> {
    // Durable: a power loss must not bring back a spec of a VM that now lives on another host.
    await this.#removeVmDir(name);
    this.#vms.delete(name);
  }

  get #trashDir(): string {
    return join(this.#dataDir, 'trash');
  }

  /**
   * A VM's directory goes in one step: a durable rename out of vms/, then the
   * removal. Removed file by file in place, an agent killed half-way left a
   * spec without the migration record beside it, and came back with a stopped
   * copy of a VM that runs on another host (chaos seed 17767 run 37).
   */
  async #removeVmDir(name: string): Promise<void> {
    const doomed = join(this.#trashDir, `${name}.${randomUUID()}`);
    await mkdirDurable(this.#trashDir, this.#dataDir);
    try {
      await renameDurable(this.vmDir(name), doomed);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    await removeDurable(doomed);
  }

  /**
   * Durable before it resolves (file and every directory entry down from the
   * data directory): once a migrated VM is adopted the source deletes its
   * disks, and a spec lost to a power cut would leave this host's images
   * looking like an interrupted incoming migration.
   */
  async #persist(spec: VmSpec): Promise<void> {
    const dir = await this.makeVmDir(spec.name);
    await writeFileDurable(join(dir, 'spec.json'), JSON.stringify(spec, null, 2));
  }

  /** At start-up: a tap that will not go is logged, never a reason for the agent not to serve. */
  async #removeTaps(vm: string): Promise<void> {
    await removeTapsOf(vm).catch((err: unknown) => this.#logger.error({ err: describeError(err), vm }, `could not remove the taps of ${vm}`));
  }

  #require(name: string): VmEntry {
    const entry = this.#vms.get(name);
    if (!entry) throw new VmferryError('VMF_NOT_FOUND', `no VM named ${name} on ${this.hostId}`);
    return entry;
  }

  #idle(name: string): VmEntry {
    const entry = this.#require(name);
    if (entry.migrating) throw new VmferryError('VMF_CONFLICT', `VM ${name} is migrating; wait or cancel the migration`);
    return entry;
  }
}

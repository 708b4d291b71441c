/**
 * What the end-to-end fault tests share: a VM running the test guest on a
 * LocalCluster's host A (a local and a shared disk), waits on a migration
 * record, and the checks a user relies on after a fault: the VM runs on one
 * host only, its guest keeps writing, nothing is left on the other host, and
 * verify mode finds every acknowledged record.
 */
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pollUntil } from '../../src/util/poll.ts';
import type { LocalCluster } from '../../src/demo/local-cluster.ts';
import { checkVerify, type GuestOptions, readGuestReport, testGuestBoot, waitForAcks, waitForGuest } from '../../src/guest/test-guest.ts';
import { verifyDisks } from '../../src/guest/verify.ts';
import type { MigrationRecord } from '../../src/store/store.ts';

const MiB = 1024 * 1024;
/** The record area of each disk; verify mode reads the same span. */
const spanMiB = 8;
const terminalPhases = ['completed', 'failed', 'cancelled'];

export class FaultCluster {
  readonly cluster: LocalCluster;
  /** Where verify mode puts its scratch files. */
  readonly #workDir: string;

  constructor(cluster: LocalCluster, workDir: string) {
    this.cluster = cluster;
    this.#workDir = workDir;
  }

  /** The guest's report channel of `vm` on every host (only the one it runs on grows). */
  reportLogs(vm: string): string[] {
    return this.cluster.hosts.map((h) => join(h.dataDir, 'vms', vm, 'serial1.log'));
  }

  /** Pids of every QEMU of this VM, by host (its run directory lies in the host's data directory). */
  async qemuPids(vm: string): Promise<Map<string, number[]>> {
    const found = new Map<string, number[]>(this.cluster.hosts.map((h) => [h.id, []]));
    for (const entry of await readdir('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
      if (!cmdline.startsWith('qemu-system')) continue;
      for (const host of this.cluster.hosts) {
        if (cmdline.includes(join(host.dataDir, 'vms', vm, 'qemu'))) found.get(host.id)?.push(Number(entry));
      }
    }
    return found;
  }

  /**
   * Creates `vm` on A (local disk root, 64 MiB by default; shared volume
   * data, 64 MiB by default; 192 MiB of memory by default), starts it and
   * waits until its guest writes.
   */
  async startVm(
    vm: string,
    guest: Omit<GuestOptions, 'mode' | 'spanMiB' | 'bulkDisks'> = { intervalMs: 0 },
    rootMiB = 64,
    sizes: { memoryMiB?: number; dataMiB?: number } = {},
  ): Promise<void> {
    await this.cluster.createVolume(`${vm}-data`, (sizes.dataMiB ?? 64) * MiB);
    const { host, port } = this.cluster.storageNbd;
    await this.cluster.api.createVm('A', {
      name: vm,
      memoryMiB: sizes.memoryMiB ?? 192,
      ...testGuestBoot({ spanMiB, ...guest }),
      disks: [
        { id: 'root', local: { sizeBytes: rootMiB * MiB } },
        { id: 'data', shared: { server: { type: 'inet', host, port }, export: `${vm}-data` } },
      ],
    });
    await this.cluster.api.startVm(vm);
    await waitForAcks(this.reportLogs(vm), ['root', 'data'], { atLeast: 20, timeoutMs: 90_000 });
  }

  async waitForPhase(id: string, phases: string[], timeoutMs: number): Promise<MigrationRecord> {
    let phase = '';
    return pollUntil(
      async () => {
        const record = await this.cluster.api.migration(id);
        phase = record.phase;
        if (phases.includes(record.phase)) return record;
        if (terminalPhases.includes(record.phase)) {
          throw new Error(`migration ${id} ended "${record.phase}" while waiting for ${phases.join('/')}: ${record.report?.error?.message ?? ''}`);
        }
        return undefined;
      },
      { timeoutMs, intervalMs: 100, timeoutMessage: () => `migration ${id} is "${phase}", not ${phases.join('/')}, after ${timeoutMs} ms` },
    );
  }

  /** The record once the migration has ended, however it ended. */
  async finalRecord(id: string, timeoutMs = 180_000): Promise<MigrationRecord> {
    let phase = '';
    return pollUntil(
      async () => {
        const record = await this.cluster.api.migration(id);
        phase = record.phase;
        return terminalPhases.includes(record.phase) ? record : undefined;
      },
      { timeoutMs, intervalMs: 100, timeoutMessage: () => `migration ${id} is still "${phase}" after ${timeoutMs} ms` },
    );
  }

  /**
   * The VM runs on `host` and nowhere else, its guest keeps acknowledging
   * writes, and the other host has neither a QEMU nor a volume of it.
   */
  async assertRunsOnlyOn(vm: string, host: string): Promise<void> {
    const info = await this.cluster.api.vm(vm);
    assert.equal(info.host, host, `the controller places ${vm} on ${host}`);
    assert.equal(info.state, 'running');
    const pids = await this.qemuPids(vm);
    assert.equal(pids.get(host)?.length, 1, `exactly one QEMU of ${vm} on ${host}`);
    for (const other of this.cluster.hosts.filter((h) => h.id !== host)) {
      assert.deepEqual(pids.get(other.id), [], `no QEMU of ${vm} left on ${other.id}`);
      const otherPool = await readdir(join(other.dataDir, 'pool'));
      assert.deepEqual(otherPool.filter((f) => f.startsWith(`${vm}-`)), [], `no volume of ${vm} left in ${other.id}'s pool`);
    }
    const before = (await readGuestReport(this.reportLogs(vm))).acks;
    await waitForAcks(this.reportLogs(vm), ['root', 'data'], { atLeast: 10, since: before, timeoutMs: 60_000 });
  }

  /** The highest record acknowledged per disk, in the logs of `vm` on every host as they are now. */
  async acked(vm: string): Promise<Map<string, number>> {
    return (await readGuestReport(this.reportLogs(vm))).acks;
  }

  /**
   * Starts `vm` again where it lies stopped after a crash, on `host`, and checks what its guest found on its disks
   * there: every record acknowledged before (`ackedBefore`, read while the logs were there: a host that retires or
   * quarantines the VM takes its log along, and the restart begins the log on `host` anew), and nothing missing or
   * corrupt below it. Returns the outcome in words, for the reliability tally.
   */
  async startAgain(vm: string, host: string, ackedBefore: Map<string, number>): Promise<string> {
    await this.cluster.api.startVm(vm);
    const log = join(this.cluster.host(host).dataDir, 'vms', vm, 'serial1.log');
    const disks = ['root', 'data'];
    const { found } = await waitForGuest([log], `its records found on ${disks.join(' and ')}`, (r) => disks.every((d) => r.found.has(d)), { timeoutMs: 90_000 });
    const problems: string[] = [];
    for (const disk of disks) {
      const there = found.get(disk);
      const acked = ackedBefore.get(disk) ?? 0;
      if (!there) continue;
      if (there.highest < acked) problems.push(`disk ${disk}: record ${acked} was acknowledged before the restart, but the highest on the disk is ${there.highest}`);
      if (there.missing > 0 || there.corrupt > 0) problems.push(`disk ${disk}: ${there.missing} records missing and ${there.corrupt} corrupt below ${there.highest}`);
    }
    assert.deepEqual(problems, [], `every record acknowledged before ${vm} started again on ${host} is on its disks there`);
    return `started again on ${host}, its guest found every record acknowledged before (${disks.map((d) => `${d} ${ackedBefore.get(d) ?? 0}, highest there ${found.get(d)?.highest}`).join('; ')})`;
  }

  /**
   * assertRunsOnlyOn, then a forced stop and verify mode: every acknowledged
   * record is intact. The VM and its volume are removed afterwards. Returns
   * the outcome in words, for the reliability tally.
   */
  async assertSettled(vm: string, host: string): Promise<string> {
    await this.assertRunsOnlyOn(vm, host);
    await this.cluster.api.stopVm(vm, true);
    const report = await readGuestReport(this.reportLogs(vm));
    const spec = (await this.cluster.api.vm(vm)).spec;
    const verify = await verifyDisks(spec.disks, join(this.#workDir, `verify-${vm}`), { spanMiB });
    assert.deepEqual(checkVerify(verify, report.acks), [], 'every acknowledged record is intact');
    await this.cluster.api.deleteVm(vm);
    // Its QEMU is gone, but its writer lease and the verify run just now would hold the volume for the reconnect window.
    await this.cluster.removeVolume(`${vm}-data`, { force: true });
    const acked = [...report.acks.values()].reduce((a, b) => a + b, 0);
    return `VM on ${host} only, guest kept writing, ${acked} acked records intact, nothing left on ${this.cluster.hosts.filter((h) => h.id !== host).map((h) => h.id).join(', ')}`;
  }
}

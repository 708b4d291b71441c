/**
 * Continues VMs that QEMU stopped on an I/O error of a shared disk. Such a
 * disk stops its VM (werror/rerror=stop, src/qemu/command-line.ts) when the
 * storage server stayed away longer than QEMU's reconnect delay; the failed
 * requests wait inside QEMU, and `cont` retries them. So once every storage
 * server the VM's disks use answers again, the guest continues as if its disk
 * had been slow, and no write it was told succeeded is lost.
 *
 * An RBD disk never stops its VM on a Ceph outage: librbd holds the requests
 * until the cluster is back (test/migration/rbd.test.ts). It stops only on an
 * error Ceph itself returns, such as a fenced (blocklisted) client's, and a
 * fenced VM must stay stopped: so VMs whose stop no storage server explains
 * are left alone.
 *
 * A VM in a migration is never touched here: whether its source may run is
 * the migration's decision (src/migration/no-return.ts).
 */
import { connect } from 'node:net';
import type { Logger } from 'pino';
import { describeError } from '../errors.ts';
import { usesStorageServer } from '../qemu/command-line.ts';
import type { QemuProcess } from '../qemu/process.ts';
import type { NbdServerAddress, VmSpec } from '../qemu/spec.ts';

export interface IoErrorCandidate {
  name: string;
  qemu: QemuProcess;
  spec: VmSpec;
  /** Asked again just before `cont`: false once a migration took the VM meanwhile. */
  free: () => boolean;
}

export interface IoErrorResumeOptions {
  /** The VMs that may be continued: running here, in no migration. */
  candidates: () => IoErrorCandidate[];
  logger: Logger;
  /** How often the VMs' run states are read. */
  intervalMs?: number;
  /** How long one storage server may take to accept a connection. */
  probeTimeoutMs?: number;
}

/** The storage servers a VM's disks reach, once each. */
function storageServers(spec: VmSpec): NbdServerAddress[] {
  const servers = new Map<string, NbdServerAddress>();
  for (const disk of spec.disks) {
    if (!usesStorageServer(disk)) continue;
    const server = disk.source.kind === 'nbd' ? disk.source.server : disk.source.kind === 'file' ? disk.source.backing?.server : undefined;
    if (server) servers.set(JSON.stringify(server), server);
  }
  return [...servers.values()];
}

/** Whether a server accepts a connection within the time: the storage server is back, not just its host. */
function accepts(server: NbdServerAddress, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = server.type === 'inet' ? connect({ host: server.host, port: server.port }) : connect({ path: server.path });
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}

/** Starts the watch; the returned function stops it. */
export function startIoErrorResume(options: IoErrorResumeOptions): () => void {
  const { logger } = options;
  const intervalMs = options.intervalMs ?? 2_000;
  const probeTimeoutMs = options.probeTimeoutMs ?? 2_000;
  const maxBackoffMs = 5 * 60_000;
  /** VMs already reported as stopped, so an outage is logged once, not every round. */
  const reported = new Set<string>();
  /**
   * VMs continued while their storage server answered that stopped again: a write the server refuses
   * (a stale QEMU whose writer lease moved away) is no outage. Each such VM waits twice as long as the
   * last time before the next `cont`, so it is not continued in a loop.
   */
  const backoff = new Map<string, { failures: number; notBefore: number }>();
  let busy = false;

  const resumeOne = async ({ name, qemu, spec, free }: IoErrorCandidate): Promise<void> => {
    const status = await qemu.statusUnlessExited();
    if (status?.status !== 'io-error') {
      reported.delete(name);
      if (status?.running) backoff.delete(name);
      return;
    }
    const last = backoff.get(name);
    if (last && Date.now() < last.notBefore) return;
    const servers = storageServers(spec);
    const down = [];
    for (const server of servers) if (!(await accepts(server, probeTimeoutMs))) down.push(server);
    if (down.length > 0 || servers.length === 0) {
      if (!reported.has(name)) logger.warn({ vm: name, down }, `VM ${name} is stopped on an I/O error of a shared disk; it continues once its storage server answers`);
      reported.add(name);
      return;
    }
    if (!free()) return;
    await qemu.qmp(`continuing ${name} after a storage outage`, (qmp) => qmp.cont());
    reported.delete(name);
    const failures = (last?.failures ?? 0) + 1;
    // Kept until the VM is seen running: if it stops again at once, the next try waits longer.
    backoff.set(name, { failures, notBefore: Date.now() + Math.min(maxBackoffMs, intervalMs * 2 ** failures) });
    if (last) logger.error({ vm: name, failures }, `VM ${name} stopped again on a shared disk's error although its storage server answers (are its writes fenced?); continued again, ${failures} times so far`);
    else logger.info({ vm: name }, `VM ${name} continued: its storage server answers again`);
  };

  const round = async (): Promise<void> => {
    for (const candidate of options.candidates()) {
      await resumeOne(candidate).catch((err: unknown) => logger.warn({ vm: candidate.name, err: describeError(err) }, `could not check or continue VM ${candidate.name} after an I/O error`));
    }
  };
  const timer = setInterval(() => {
    // A round that outlasts the interval (storage probes timing out) is not overlapped by the next.
    if (busy) return;
    busy = true;
    void round().finally(() => {
      busy = false;
    });
  }, intervalMs);
  return () => clearInterval(timer);
}

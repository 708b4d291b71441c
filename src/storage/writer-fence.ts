/**
 * The host's half of the one-writer fence (the storage server's half is
 * writer-leases.ts). Every QEMU instance that opens a writable shared volume
 * gets a token of its own in the export name, `VOLUME@HOST.N`; the instance
 * that should write claims the volume's lease for its token. A VM starting
 * claims at once; a migration's destination claims at switch-over, after the
 * source QEMU stopped and flushed and before the destination resumes, so the
 * old source, should it somehow run on, can no longer write.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import { requestJson } from '../http/errors.ts';
import type { VmSpec } from '../qemu/spec.ts';
import type { Volume } from './volumes.ts';
import { parseExportName, type WriterLease } from './writer-leases.ts';

export class SharedWriterFence {
  readonly adminUrl: string;
  readonly #hostId: string;

  constructor(adminUrl: string, hostId: string) {
    this.adminUrl = adminUrl;
    this.#hostId = hostId;
  }

  /** A copy of `spec` whose writable shared disks carry a token new to this host and QEMU instance. */
  async tokenize(spec: VmSpec, signal?: AbortSignal): Promise<VmSpec> {
    const tokenized = structuredClone(spec);
    for (const disk of tokenized.disks) {
      if (disk.source.kind !== 'nbd' || disk.readOnly) continue;
      const { volume } = parseExportName(disk.source.export);
      const current = await this.#volume(volume, signal);
      disk.source.export = `${volume}@${this.#hostId}.${(current.writer?.generation ?? 0) + 1}`;
    }
    return tokenized;
  }

  /** Grants every writable shared disk's lease to the token in its export name; returns the leases. */
  async claim(spec: VmSpec, signal?: AbortSignal): Promise<WriterLease[]> {
    const leases: WriterLease[] = [];
    for (const disk of spec.disks) {
      if (disk.source.kind !== 'nbd' || disk.readOnly) continue;
      const { volume, token } = parseExportName(disk.source.export);
      if (token === undefined) continue;
      const current = await this.#volume(volume, signal);
      if (current.writer?.holder === token) {
        leases.push(current.writer);
        continue;
      }
      leases.push(
        await whileRestarting(signal, () =>
          requestJson<WriterLease>(this.adminUrl, 'PUT', `/v1/volumes/${encodeURIComponent(volume)}/writer`, {
            body: { holder: token, generation: (current.writer?.generation ?? 0) + 1 },
            signal,
            timeoutMs: 40_000,
          }),
        ),
      );
    }
    return leases;
  }

  #volume(name: string, signal: AbortSignal | undefined): Promise<Volume> {
    return whileRestarting(signal, () => requestJson<Volume>(this.adminUrl, 'GET', `/v1/volumes/${encodeURIComponent(name)}`, { signal, timeoutMs: 10_000 }));
  }
}

/** How long a storage server that refuses connections counts as restarting rather than down. */
const restartGraceMs = 15_000;

/** Retries `request` while the storage server is unreachable, for at most restartGraceMs: a restart must not fail a switch-over. */
async function whileRestarting<T>(signal: AbortSignal | undefined, request: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + restartGraceMs;
  for (;;) {
    try {
      return await request();
    } catch (err) {
      if (!(err instanceof VmferryError && err.code === 'VMF_UNREACHABLE') || Date.now() > deadline) throw err;
      await sleep(250, undefined, { signal });
    }
  }
}

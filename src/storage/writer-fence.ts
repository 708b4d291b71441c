/**
 * The host's half of the one-writer fence (the storage server's half is
 * writer-leases.ts). Every QEMU instance that opens a writable shared volume
 * gets a token of its own in the export name, `VOLUME@HOST.RANDOM`; the
 * instance that should write claims the volume's lease for its token. A VM
 * starting claims at once; a migration's destination claims at switch-over,
 * after the source QEMU stopped and flushed and before the destination
 * resumes, so the old source, should it somehow run on, can no longer write.
 * An agent that killed a QEMU which may have claimed releases its leases;
 * the volume then stays fenced with nobody writing until the next claim.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmferryError } from '../errors.ts';
import { requestJson } from '../http/errors.ts';
import type { VmSpec } from '../qemu/spec.ts';
import type { TlsIdentity } from '../security/tls-files.ts';
import { parseExportName, type WriterLease } from './writer-leases.ts';

/** The writable shared disks of `spec` that carry a writer token, as volume and token. */
function tokenizedVolumes(spec: VmSpec): { volume: string; token: string }[] {
  return spec.disks.flatMap((disk) => {
    if (disk.source.kind !== 'nbd' || disk.readOnly) return [];
    const { volume, token } = parseExportName(disk.source.export);
    return token === undefined ? [] : [{ volume, token }];
  });
}

export class SharedWriterFence {
  readonly adminUrl: string;
  readonly #hostId: string;
  readonly #tls: TlsIdentity | undefined;

  /** tls: the agent's identity, presented to the storage server's admin API. */
  constructor(adminUrl: string, hostId: string, tls?: TlsIdentity) {
    this.adminUrl = adminUrl;
    this.#hostId = hostId;
    this.#tls = tls;
  }

  /**
   * A copy of `spec` whose writable shared disks carry a token new to this
   * QEMU instance: the host id and a random part, so two instances, even
   * started at once on one host, never share one. Fails early for a volume
   * the storage server does not have.
   */
  async tokenize(spec: VmSpec, signal?: AbortSignal): Promise<VmSpec> {
    const tokenized = structuredClone(spec);
    const token = `${this.#hostId}.${randomBytes(8).toString('hex')}`;
    for (const disk of tokenized.disks) {
      if (disk.source.kind !== 'nbd' || disk.readOnly) continue;
      const { volume } = parseExportName(disk.source.export);
      await whileRestarting(signal, () => requestJson(this.adminUrl, 'GET', `/v1/volumes/${encodeURIComponent(volume)}`, { signal, timeoutMs: 10_000, tls: this.#tls, server: { role: 'storage' } }));
      disk.source.export = `${volume}@${token}`;
    }
    return tokenized;
  }

  /** Grants every writable shared disk's lease to the token in its export name (the server numbers the grant); returns the leases. */
  async claim(spec: VmSpec, signal?: AbortSignal): Promise<WriterLease[]> {
    const leases: WriterLease[] = [];
    for (const { volume, token } of tokenizedVolumes(spec)) {
      leases.push(
        await whileRestarting(signal, () =>
          requestJson<WriterLease>(this.adminUrl, 'PUT', `/v1/volumes/${encodeURIComponent(volume)}/writer`, { body: { holder: token }, signal, timeoutMs: 40_000, tls: this.#tls, server: { role: 'storage' } }),
        ),
      );
    }
    return leases;
  }

  /**
   * Gives up the leases `spec`'s tokens still hold, for a QEMU that is gone:
   * nobody writes those volumes until the next claim. A lease another token
   * holds by now, or a volume that no longer exists, is left alone.
   */
  async release(spec: VmSpec, signal?: AbortSignal): Promise<void> {
    for (const { volume, token } of tokenizedVolumes(spec)) {
      try {
        await whileRestarting(signal, () =>
          requestJson(this.adminUrl, 'POST', `/v1/volumes/${encodeURIComponent(volume)}/writer/release`, { body: { holder: token }, signal, timeoutMs: 40_000, tls: this.#tls, server: { role: 'storage' } }),
        );
      } catch (err) {
        if (!(err instanceof VmferryError && err.code === 'VMF_VOLUME_NOT_FOUND')) throw err;
      }
    }
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

// A volume's life on the storage server: opening races deleting, a deleted
// volume's name is used again, a client drops and QEMU reconnects, a catalog
// comes back older than its volumes, and a write fails under a FLUSH. In each,
// no write the server acknowledged may end up anywhere but in the volume the
// client asked for, and no volume file may be removed on a guess.
import assert from 'node:assert/strict';
import { copyFile, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { requestJson } from '../../src/http/errors.ts';
import { NbdBackendError, type NbdBackend } from '../../src/nbd/backend.ts';
import { NbdClient, NbdRequestError } from '../../src/nbd/client.ts';
import { NbdErrno } from '../../src/nbd/constants.ts';
import { StorageServer, type StorageServerOptions } from '../../src/storage/server.ts';
import type { QuarantinedFile } from '../../src/storage/quarantine.ts';
import { reconnectWindowMs, type Volume } from '../../src/storage/volumes.ts';
import { Cleanup } from '../support/cleanup.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';

const MiB = 1024 * 1024;
const cleanup = new Cleanup();
let dir: string;

before(async () => {
  const temp = await makeTempDir('volume-lifecycle');
  cleanup.add('temp dir', () => temp.remove());
  dir = temp.path;
});
after(() => cleanup.run());

async function startServer(dataDir: string, volumes?: StorageServerOptions['volumes']): Promise<StorageServer> {
  const server = await StorageServer.start({
    dataDir,
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    nbd: { host: '127.0.0.1', port: 0 },
    admin: { host: '127.0.0.1', port: 0 },
    ...(volumes ? { volumes } : {}),
  });
  return server;
}

function connect(server: StorageServer, exportName: string): Promise<NbdClient> {
  return NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: server.addresses.nbdPort as number }, { exportName, timeoutMs: 10_000 });
}

async function fileBytes(dataDir: string, name: string, offset: number, length: number): Promise<Buffer | undefined> {
  const file = await readFile(join(dataDir, 'volumes', `${name}.raw`)).catch(() => undefined);
  return file?.subarray(offset, offset + length);
}

test('an open racing a delete: either the open fails or the delete is refused; a FUA write and FLUSH never land in an unlinked file', async () => {
  const dataDir = join(dir, 'race');
  const server = await startServer(dataDir);
  cleanup.add('race server', () => server.close());
  const volumes = server.volumes;
  const block = Buffer.alloc(4096, 0x5a);

  // In-process, the open and the delete start in the same tick: the narrowest possible race, every time.
  await volumes.create('twin', MiB);
  const [opened, deleted] = await Promise.allSettled([volumes.open('twin', 'client-1'), volumes.remove('twin')]);
  const backend = opened.status === 'fulfilled' ? opened.value : undefined;
  if (backend) {
    assert.equal(deleted.status, 'rejected', 'the delete went through under an open client');
    assert.match(String(deleted.reason), /has clients \(client-1\)/);
    await backend.write(0, [block], true);
    await backend.flush();
    assert.deepEqual(await fileBytes(dataDir, 'twin', 0, 4096), block, 'the acknowledged write is in the volume the client opened');
    volumes.release('twin', 'client-1');
  } else {
    assert.equal(deleted.status, 'fulfilled');
  }
  // Whatever happened, a volume made again under that name starts empty and has a file of its own.
  await volumes.remove('twin', { force: true }).catch(() => undefined);
  await volumes.create('twin', MiB);
  const fresh = await volumes.open('twin', 'client-2');
  assert.ok(fresh);
  await fresh.write(4096, [block], true);
  assert.ok((await fileBytes(dataDir, 'twin', 0, 4096))?.every((b) => b === 0), 'the new volume has none of the old one\'s bytes');
  assert.deepEqual(await fileBytes(dataDir, 'twin', 4096, 4096), block, 'the new volume\'s write reached the new file');
  volumes.release('twin', 'client-2');

  // Over the network, as QEMU does it: NBD GO and DELETE 0-3 ms apart.
  let acknowledged = 0;
  let refusedDeletes = 0;
  let failedOpens = 0;
  for (let round = 0; round < 60; round++) {
    const name = `race-${round}`;
    await volumes.create(name, MiB);
    const connecting = connect(server, name).then(
      (client) => client,
      () => undefined,
    );
    await sleep(round % 4);
    const deleting = requestJson(server.addresses.adminUrl as string, 'DELETE', `/v1/volumes/${name}`).then(
      () => true,
      () => false,
    );
    const [client, wasDeleted] = await Promise.all([connecting, deleting]);
    if (!client) {
      failedOpens++;
      assert.ok(wasDeleted, `round ${round}: the open failed although the volume was not deleted`);
      continue;
    }
    refusedDeletes++;
    let acked = false;
    try {
      await client.write(0, block, { fua: true });
      await client.flush();
      acked = true;
    } catch (err) {
      assert.ok(err instanceof NbdRequestError, `round ${round}: ${(err as Error).message}`);
    }
    await client.close();
    if (acked) acknowledged++;
    assert.equal(wasDeleted, false, `round ${round}: the volume was deleted under an open client (${acked ? 'a FUA write and a FLUSH were acknowledged into the unlinked file' : 'nothing acknowledged'})`);
    if (acked) assert.deepEqual(await fileBytes(dataDir, name, 0, 4096), block, `round ${round}: the acknowledged write is not in the volume`);
    await volumes.remove(name, { force: true });
  }
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'an open and a delete of one volume in the same tick, then 60 rounds of NBD GO against DELETE 0-3 ms apart',
    observed: `never both: ${refusedDeletes} deletes refused (${acknowledged} FUA write + FLUSH acknowledged, all in the volume), ${failedOpens} opens failed after the delete; a re-created volume got a file of its own`,
    ok: true,
  });
});

test('a client that just disconnected may be reconnecting: its volume is not deleted without --force; a writer lease blocks it too', async () => {
  const dataDir = join(dir, 'reconnect');
  const server = await startServer(dataDir);
  cleanup.add('reconnect server', () => server.close());
  const adminUrl = server.addresses.adminUrl as string;
  await server.volumes.create('busy', MiB);
  const client = await connect(server, 'busy');
  await client.write(0, Buffer.alloc(4096, 1));
  await client.close();

  await assert.rejects(requestJson(adminUrl, 'DELETE', '/v1/volumes/busy'), (err: Error) => {
    assert.match(err.message, new RegExp(`lost a client .* s ago, and QEMU reconnects for up to ${reconnectWindowMs / 1000} s.*--force`));
    return true;
  });
  const shown = await requestJson<Volume>(adminUrl, 'GET', '/v1/volumes/busy');
  assert.ok(shown.lastDetachedAt !== null && Date.now() - shown.lastDetachedAt < reconnectWindowMs);
  await requestJson(adminUrl, 'DELETE', '/v1/volumes/busy?force=true');
  await assert.rejects(requestJson(adminUrl, 'GET', '/v1/volumes/busy'), /no volume named "busy"/);

  // Never opened, but a writer holds its lease: a VM may be about to use it.
  await server.volumes.create('leased', MiB);
  await requestJson(adminUrl, 'PUT', '/v1/volumes/leased/writer', { body: { holder: 'host-a.0123' } });
  await assert.rejects(requestJson(adminUrl, 'DELETE', '/v1/volumes/leased'), /has a writer \(lease generation 1\).*--force/);
  await requestJson(adminUrl, 'POST', '/v1/volumes/leased/writer/release', { body: { holder: 'host-a.0123' } });
  await requestJson(adminUrl, 'DELETE', '/v1/volumes/leased');

  // Clients attached when the server stopped reconnect after it restarts: the window opens again then.
  await server.volumes.create('kept', MiB);
  const attached = await connect(server, 'kept');
  await server.close();
  attached.destroy();
  const restarted = await startServer(dataDir);
  cleanup.add('restarted reconnect server', () => restarted.close());
  await assert.rejects(restarted.volumes.remove('kept'), /lost a client/);
});

test('a catalog restored without its -wal file: volumes created since go to quarantine, and restore brings their bytes back', async () => {
  const dataDir = join(dir, 'quarantine');
  const early = await startServer(dataDir);
  await early.volumes.create('early', MiB);
  await early.close();
  // The backup: the catalog as it was, without the WAL of what came later.
  await copyFile(join(dataDir, 'catalog.db'), join(dir, 'catalog-backup.db'));

  const server = await startServer(dataDir);
  await server.volumes.create('late', 4 * MiB);
  const client = await connect(server, 'late');
  const data = Buffer.alloc(2 * MiB);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i ^ 0x9e3779b9) >>> 0, i);
  await client.write(MiB, data, { fua: true });
  await client.close();
  await server.close();

  await copyFile(join(dir, 'catalog-backup.db'), join(dataDir, 'catalog.db'));
  await rm(join(dataDir, 'catalog.db-wal'), { force: true });
  await rm(join(dataDir, 'catalog.db-shm'), { force: true });

  const restarted = await startServer(dataDir);
  cleanup.add('quarantine server', () => restarted.close());
  const adminUrl = restarted.addresses.adminUrl as string;
  assert.deepEqual((await requestJson<Volume[]>(adminUrl, 'GET', '/v1/volumes')).map((v) => v.name), ['early']);
  const quarantined = await requestJson<QuarantinedFile[]>(adminUrl, 'GET', '/v1/quarantine');
  assert.deepEqual(quarantined.map((q) => [q.name, q.sizeBytes]), [['late', 4 * MiB]]);

  const restored = await requestJson<Volume>(adminUrl, 'POST', '/v1/quarantine/late/restore');
  assert.deepEqual([restored.name, restored.sizeBytes, restored.readOnly], ['late', 4 * MiB, false]);
  assert.deepEqual(await requestJson<QuarantinedFile[]>(adminUrl, 'GET', '/v1/quarantine'), []);
  const reader = await connect(restarted, 'late');
  assert.ok((await reader.read(MiB, 2 * MiB)).equals(data), 'the restored volume has every byte written before the catalog went back');
  await reader.close();

  // Purge is the only way a quarantined file goes; a name that is not there is a 404.
  await assert.rejects(requestJson(adminUrl, 'POST', '/v1/quarantine/late/restore'), /nothing named "late" in quarantine/);
  await assert.rejects(requestJson(adminUrl, 'DELETE', '/v1/quarantine/nope'), /nothing named "nope" in quarantine/);
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'catalog replaced by a copy taken before a volume was created (no -wal), server restarted',
    observed: 'the unknown volume file was moved to quarantine, listed, and restored with its 2 MiB of data intact',
    ok: true,
  });
});

/** Fails the next write that reaches it, once, as a disk that lost a sector would. */
class FailOnce {
  armed = false;

  layer = (next: NbdBackend): NbdBackend => {
    const fault = {
      get size(): number {
        return next.size;
      },
      get readOnly(): boolean {
        return next.readOnly;
      },
      read: (offset: number, target: Buffer) => next.read(offset, target),
      write: (offset: number, data: readonly Buffer[], fua: boolean): Promise<void> => {
        if (!this.armed) return next.write(offset, data, fua);
        this.armed = false;
        return Promise.reject(new NbdBackendError(NbdErrno.EIO, 'injected write error'));
      },
      writeZeroes: (offset: number, length: number, fua: boolean, noHole: boolean) => next.writeZeroes(offset, length, fua, noHole),
      trim: (offset: number, length: number, fua: boolean) => next.trim(offset, length, fua),
      flush: () => next.flush(),
      blockStatus: (offset: number, length: number) => next.blockStatus(offset, length),
    };
    return fault;
  };
}

test('a failed write is sticky: every later FLUSH on the volume fails, from any connection, until it is opened afresh', async () => {
  const fault = new FailOnce();
  const dataDir = join(dir, 'sticky');
  const server = await startServer(dataDir, { fileLayer: fault.layer });
  cleanup.add('sticky server', () => server.close());
  await server.volumes.create('disk', MiB);
  const writer = await connect(server, 'disk');
  const other = await connect(server, 'disk');

  fault.armed = true;
  await assert.rejects(writer.write(0, Buffer.alloc(4096, 7)), /EIO/);
  await assert.rejects(other.flush(), /EIO/, 'the other connection\'s FLUSH must not succeed over lost data');
  await assert.rejects(writer.flush(), /EIO/, 'the writer\'s own FLUSH fails even after another connection flushed');
  await writer.write(4096, Buffer.alloc(4096, 8));
  await assert.rejects(writer.flush(), /EIO/, 'a later successful write does not clear the error');
  await writer.close();
  await other.close();

  const reopened = await connect(server, 'disk');
  await reopened.write(0, Buffer.alloc(4096, 9));
  await reopened.flush();
  await reopened.close();
  recordReliability(import.meta.url, {
    kind: 'fault',
    target: 'storage server',
    tried: 'one write fails (injected EIO) with two connections on the volume; both FLUSH afterwards',
    observed: 'every FLUSH on the volume failed with EIO until all clients had gone; after a fresh open, FLUSH works again',
    ok: true,
  });
});

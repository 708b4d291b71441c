// Bugs the fuzz campaigns found, each pinned by the smallest input that showed it.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { NbdClient, NbdRequestError } from '../../src/nbd/client.ts';
import { recordReliability } from '../support/reliability.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';

let storage: TestStorage;

before(async () => {
  storage = await startTestStorage();
  await storage.server.volumes.create('vol', 1024 * 1024);
});
after(() => storage.stop());

test('NBD: BLOCK_STATUS of length 0 gets EINVAL, not a 0-byte extent', async () => {
  const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, { exportName: 'vol' });
  try {
    const error = await client.blockStatus(0, 0).then(() => undefined, (err: unknown) => err);
    assert.ok(error instanceof NbdRequestError, `expected an NBD error, got ${String(error)}`);
    assert.equal(error.errno, 22);
    assert.ok((await client.blockStatus(0, 4096)).every((extent) => extent.length > 0), 'a normal request still works');
    recordReliability(import.meta.url, { kind: 'bad-input', target: 'NBD', tried: 'BLOCK_STATUS with length 0 (found by the request fuzzer)', observed: 'EINVAL "zero length" (was: a 0-byte extent, which the protocol forbids)', ok: true });
  } finally {
    await client.close();
  }
});

// The storage server's GET /metrics counts what its NBD clients did to each volume: requests by
// operation and result (a write the writer fence refused is a failed one), as many timed requests as
// were made, the exact bytes of data read and written, the open connections and the writer lease.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.ts';
import { startTestStorage, type TestStorage } from '../support/storage.ts';

const KiB = 1024;
let storage: TestStorage;

before(async () => {
  storage = await startTestStorage();
});
after(async () => {
  await storage.stop();
});

/** Each sample of the exposition, `name{labels}` → value. */
async function scrape(): Promise<Map<string, number>> {
  const response = await fetch(`${storage.adminUrl}/metrics`);
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  const samples = new Map<string, number>();
  for (const line of (await response.text()).split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const space = line.lastIndexOf(' ');
    samples.set(line.slice(0, space), Number(line.slice(space + 1)));
  }
  return samples;
}

test('GET /metrics counts each volume\'s NBD requests, their time, its bytes, connections and writer lease', async () => {
  await storage.server.volumes.create('metered', 1024 * KiB);
  await storage.server.volumes.create('idle', 1024 * KiB);
  const writer = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, { exportName: 'metered@host-a.1' });
  const stranger = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: storage.nbdPort }, { exportName: 'metered' });
  try {
    for (let i = 0; i < 3; i++) await writer.write(i * 64 * KiB, Buffer.alloc(64 * KiB, i + 1));
    assert.deepEqual(await writer.read(0, 128 * KiB), Buffer.concat([Buffer.alloc(64 * KiB, 1), Buffer.alloc(64 * KiB, 2)]));
    await writer.flush();
    await storage.server.volumes.grantWriter('metered', 'host-a.1');
    await assert.rejects(stranger.write(0, Buffer.alloc(4 * KiB)), 'the fence refuses a write without the lease holder\'s token');
    await writer.trim(512 * KiB, 64 * KiB);

    const samples = await scrape();
    const requests = (op: string, result: string): number | undefined => samples.get(`vmferry_storage_nbd_requests_total{volume="metered",op="${op}",result="${result}"}`);
    assert.equal(requests('write', 'ok'), 3);
    assert.equal(requests('write', 'failed'), 1);
    assert.equal(requests('read', 'ok'), 1);
    assert.equal(requests('flush', 'ok'), 1);
    assert.equal(requests('trim', 'ok'), 1);
    assert.equal(requests('block_status', 'ok'), 0);
    assert.equal(samples.get('vmferry_storage_nbd_request_duration_seconds_count{volume="metered"}'), 7, 'every request timed once');
    assert.equal(samples.get('vmferry_storage_nbd_request_duration_seconds_bucket{volume="metered",le="+Inf"}'), 7);
    assert.ok((samples.get('vmferry_storage_nbd_request_duration_seconds_sum{volume="metered"}') ?? 0) > 0);
    assert.equal(samples.get('vmferry_storage_nbd_bytes_total{volume="metered",direction="write"}'), 3 * 64 * KiB, 'the refused write moved nothing');
    assert.equal(samples.get('vmferry_storage_nbd_bytes_total{volume="metered",direction="read"}'), 128 * KiB);
    assert.equal(samples.get('vmferry_storage_nbd_volume_connections{volume="metered"}'), 2);
    assert.equal(samples.get('vmferry_storage_nbd_connections'), 2);
    assert.equal(samples.get('vmferry_storage_writer_lease_held{volume="metered"}'), 1);
    assert.equal(samples.get('vmferry_storage_writer_lease_generation{volume="metered"}'), 1);
    assert.equal(samples.get('vmferry_storage_volumes'), 2);
    assert.equal(samples.get('vmferry_storage_nbd_requests_total{volume="idle",op="write",result="ok"}'), 0, 'a volume nobody opened is listed, at zero');
    assert.equal(samples.get('vmferry_storage_writer_lease_held{volume="idle"}'), undefined, 'no lease was ever granted on it');
  } finally {
    await writer.close();
    await stranger.close();
  }
});

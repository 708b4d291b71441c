// TLS on the streams between two agents' QEMUs, each with its host's `vmferry pki` identity: the RAM
// migration and the mirror run over TLS (QEMU's own query-migrate-parameters says so on both sides);
// while the mirror runs, the destination's export refuses a plaintext client, a certificate of another
// CA, and every cluster certificate but the source agent's (so QEMU names certificates as qemuPeerName
// says); TLS on one side only is refused before anything moves, and the guest runs on at A.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { checkVerify } from '../../src/guest/test-guest.ts';
import type { MigrationParameters } from '../../src/qmp/commands.ts';
import { initCa, issueCertificate } from '../../src/security/pki.ts';
import { loadTlsIdentity, type TlsIdentity } from '../../src/security/tls-files.ts';
import { writeQemuTlsDir } from '../../src/qemu/tls-creds.ts';
import { MigrationRig } from '../support/migration-rig.ts';
import { makeTempDir } from '../support/temp.ts';

let work: { path: string; remove(): Promise<void> };
let rig: MigrationRig;
/** Client identities in the layout nbdinfo's tls-certificates reads (ca-cert, client-cert, client-key). */
const clients: Record<'sourceAgent' | 'operator' | 'otherCa', string> = { sourceAgent: '', operator: '', otherCa: '' };

before(async () => {
  work = await makeTempDir('qemu-streams');
  const pki = join(work.path, 'pki');
  const otherPki = join(work.path, 'other-pki');
  await initCa(pki);
  await initCa(otherPki);
  const issue = async (dir: string, role: 'agent' | 'operator', id: string): Promise<string> =>
    (await issueCertificate(dir, { role, id, ...(role === 'agent' ? { addresses: ['127.0.0.1'] } : {}) })).dir;
  const [a, b] = [await issue(pki, 'agent', 'A'), await issue(pki, 'agent', 'B')];
  // As an agent writes its identity for QEMU.
  const forQemu = (dir: string, id: string): Promise<string> => writeQemuTlsDir(loadTlsIdentity({ pkiDir: dir }, 'server') as TlsIdentity, join(work.path, `qemu-${id}`));
  const storage = loadTlsIdentity({ pkiDir: (await issueCertificate(pki, { role: 'storage', id: 'storage', addresses: ['127.0.0.1'] })).dir }, 'server') as TlsIdentity;
  const tls = { A: await forQemu(a, 'A'), B: await forQemu(b, 'B'), storage };
  clients.sourceAgent = a;
  clients.operator = await issue(pki, 'operator', 'alice');
  // The source's own host id, from a CA the cluster does not trust.
  clients.otherCa = await issue(otherPki, 'agent', 'A');
  rig = await MigrationRig.start('tls', { local: [{ id: 'local0', sizeMiB: 64 }], shared: [{ id: 'shared0', sizeMiB: 32 }] }, { mode: 'workload', spanMiB: 8 }, tls);
});

after(async () => {
  await rig?.cleanup.run();
  await work?.remove();
});

/** nbdinfo's answer: the export's size, or why it could not get it. */
async function nbdinfo(url: string): Promise<string> {
  try {
    return (await promisify(execFile)('nbdinfo', ['--size', url], { timeout: 20_000 })).stdout.trim();
  } catch (err) {
    return `refused: ${String((err as { stderr?: string }).stderr ?? err).trim()}`;
  }
}

test('TLS on one side only: refused before anything moves, naming the problem; the guest runs on at A', async () => {
  await rig.waitForAcks(5);
  const plan = await rig.plan();
  const expected = {
    // A destination without credentials cannot open the shared disk on a storage server that takes TLS only: it fails there, sooner.
    destination: /TLS mismatch: the agent on A has a TLS identity .* but the destination at 127\.0\.0\.1 takes plain TCP|disk-shared0.*TLS negotiation required/,
    source: /TLS mismatch: the destination at 127\.0\.0\.1 takes migration streams over TLS only, but the agent on A has no TLS identity/,
  };
  for (const [withoutTls, message] of Object.entries(expected) as ['source' | 'destination', RegExp][]) {
    const report = await rig.migrate(plan, { withoutTls });
    assert.equal(report.outcome, 'failed', withoutTls);
    assert.ok(['VMF_MIGRATION_REFUSED', 'VMF_QEMU_START'].includes(report.error?.code ?? ''), report.error?.message);
    assert.match(report.error?.message ?? '', message);
    assert.equal(report.ram.transferredBytes, 0, 'no RAM left A');
  }
  assert.equal((await rig.source.status()).status, 'running');
  assert.deepEqual(rig.poolBFiles(), [], 'the refused destinations left nothing on B');
  await rig.waitForAcks(5, (await rig.waitForAcks(0)).acks);
});

test('with TLS on both sides: RAM and mirror over TLS, the export lets in only the source agent, every acked record intact', async () => {
  const plan = await rig.plan();
  const probes: Record<string, string> = {};
  const parameters: { source?: MigrationParameters; destination?: MigrationParameters } = {};
  const report = await rig.migrate(plan, {
    beforePhase: async (phase) => {
      if (phase === 'migrating') {
        // The mirror runs into the destination's export: knock on it as others on the network could.
        const target = rig.prepared?.mirrorTargets[0];
        assert.ok(target?.server.type === 'inet' && target.tls);
        const address = `${target.server.host}:${target.server.port}/${target.exportName}`;
        probes.plaintext = await nbdinfo(`nbd://${address}`);
        // The client skips its own check of the server, so only the server's refusal can fail these.
        for (const [who, dir] of Object.entries(clients)) probes[who] = await nbdinfo(`nbds://${address}?tls-certificates=${dir}&tls-verify-peer=false`);
        parameters.destination = await rig.destination?.vm?.qmp('reading migration parameters', (qmp) => qmp.queryMigrateParameters());
      }
      if (phase === 'paused-at-switchover') parameters.source = await rig.source.qmp('reading migration parameters', (qmp) => qmp.queryMigrateParameters());
    },
  });
  assert.equal(report.outcome, 'completed', report.error?.message);
  assert.match(probes.plaintext ?? '', /refused: .*TLS/i, 'a plaintext client');
  assert.match(probes.otherCa ?? '', /^refused: /, 'a certificate of another CA');
  assert.match(probes.operator ?? '', /^refused: /, 'an operator of the cluster');
  assert.equal(probes.sourceAgent, String(64 << 20), "the source agent's certificate gets in");
  assert.deepEqual(
    { creds: parameters.source?.['tls-creds'], hostname: parameters.source?.['tls-hostname'] },
    { creds: 'vmf-tls-client', hostname: '127.0.0.1' },
  );
  assert.deepEqual({ creds: parameters.destination?.['tls-creds'], authz: parameters.destination?.['tls-authz'] }, { creds: 'vmf-tls-server', authz: 'vmf-authz-source' });

  const destinationDisks = rig.destination?.vm?.spec.disks ?? [];
  await rig.waitForAcks(5, (await rig.waitForAcks(0)).acks);
  const verify = await rig.verify(destinationDisks);
  assert.deepEqual(checkVerify(verify, (await rig.waitForAcks(0)).acks), []);
});

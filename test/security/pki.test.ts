// `vmferry pki init` and `vmferry pki issue` (the real command): certificates
// openssl verifies, carrying role, id and addresses; keys only the owner reads;
// nothing overwritten by accident; and files QEMU's tls-creds-x509 loads as
// they are, for the data streams' TLS to come.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { readFile, readdir, stat, writeFile, mkdtemp, rm } from 'node:fs/promises';
import { X509Certificate } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { issueCertificate, type IssueOptions } from '../../src/security/pki.ts';
import { loadTlsIdentity, type TlsIdentity } from '../../src/security/tls-files.ts';
import { peerNamesPredictable } from '../../src/qemu/tls-creds.ts';

const cli = resolve(import.meta.dirname, '../../bin/vmferry.js');
let dir: string;
let pki: string;

async function vmferry(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [cli, ...args]);
    return { code: 0, stdout, stderr };
  } catch (err) {
    const failed = err as { code: number; stdout: string; stderr: string };
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
  }
}

async function openssl(...args: string[]): Promise<string> {
  return (await promisify(execFile)('openssl', args)).stdout;
}

async function mode(path: string): Promise<number> {
  return (await stat(path)).mode & 0o777;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-pki-'));
  pki = join(dir, 'pki');
  const init = await vmferry('pki', 'init', '--dir', pki);
  assert.equal(init.code, 0, init.stderr);
  for (const args of [['agent', 'A', '--address', '10.0.0.2', '--address', 'host-a.example'], ['controller'], ['storage'], ['operator', 'alice']]) {
    const issued = await vmferry('pki', 'issue', ...args, '--dir', pki);
    assert.equal(issued.code, 0, issued.stderr);
  }
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('the CA and every identity: openssl verifies them, the role and id are in the certificate, keys are 0600', async () => {
  assert.equal(await mode(join(pki, 'ca-key.pem')), 0o600);
  const expected = {
    'agent-A': { files: ['ca-cert.pem', 'client-cert.pem', 'client-key.pem', 'server-cert.pem', 'server-key.pem'], san: 'URI:vmferry:agent:A, IP Address:10.0.0.2, DNS:host-a.example', usage: 'TLS Web Server Authentication, TLS Web Client Authentication' },
    controller: { files: ['ca-cert.pem', 'client-cert.pem', 'client-key.pem', 'server-cert.pem', 'server-key.pem'], san: 'URI:vmferry:controller:controller, IP Address:127.0.0.1', usage: 'TLS Web Server Authentication, TLS Web Client Authentication' },
    storage: { files: ['ca-cert.pem', 'server-cert.pem', 'server-key.pem'], san: 'URI:vmferry:storage:storage, IP Address:127.0.0.1', usage: 'TLS Web Server Authentication' },
    'operator-alice': { files: ['ca-cert.pem', 'client-cert.pem', 'client-key.pem'], san: 'URI:vmferry:operator:alice', usage: 'TLS Web Client Authentication' },
  };
  for (const [name, want] of Object.entries(expected)) {
    const identity = join(pki, name);
    assert.deepEqual((await readdir(identity)).sort(), want.files, name);
    const certFile = join(identity, want.files.includes('server-cert.pem') ? 'server-cert.pem' : 'client-cert.pem');
    assert.match(await openssl('verify', '-CAfile', join(pki, 'ca-cert.pem'), certFile), /: OK/);
    const cert = new X509Certificate(await readFile(certFile));
    assert.equal(cert.subjectAltName, want.san, name);
    const [role, id = role] = name.split('-') as [string, string?];
    assert.equal(cert.subject, `O=vmferry\nOU=${role}\nCN=${id}`);
    assert.match(await openssl('x509', '-in', certFile, '-noout', '-ext', 'extendedKeyUsage'), new RegExp(want.usage));
    for (const key of want.files.filter((f) => f.endsWith('-key.pem'))) assert.equal(await mode(join(identity, key)), 0o600, `${name}/${key}`);
    assert.equal(await mode(identity), 0o700);
  }
});

test('nothing is overwritten without --force; a forced issue rotates the key', async () => {
  const caBefore = await readFile(join(pki, 'ca-cert.pem'), 'utf8');
  const again = await vmferry('pki', 'init', '--dir', pki);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /already holds a CA.*--force.*VMF_CONFLICT/);
  assert.equal(await readFile(join(pki, 'ca-cert.pem'), 'utf8'), caBefore);

  const keyBefore = await readFile(join(pki, 'agent-A', 'server-key.pem'), 'utf8');
  const reissue = await vmferry('pki', 'issue', 'agent', 'A', '--dir', pki);
  assert.equal(reissue.code, 1);
  assert.match(reissue.stderr, /already exists.*--force/);
  const rotated = await vmferry('pki', 'issue', 'agent', 'A', '--dir', pki, '--force');
  assert.equal(rotated.code, 0, rotated.stderr);
  assert.notEqual(await readFile(join(pki, 'agent-A', 'server-key.pem'), 'utf8'), keyBefore);
  assert.match(await openssl('verify', '-CAfile', join(pki, 'ca-cert.pem'), join(pki, 'agent-A', 'server-cert.pem')), /: OK/);
});

test('bad input is named: a role, a missing id, an id, an address, an operator with an address, no CA', async () => {
  for (const [args, message] of [[['admin', 'x'], /ROLE must be one of controller, agent, storage, operator/], [['agent'], /needs an ID: the host id/]] as const) {
    const result = await vmferry('pki', 'issue', ...args, '--dir', pki);
    assert.equal(result.code, 1, args.join(' '));
    assert.match(result.stderr, message);
  }
  const cases: [IssueOptions, RegExp][] = [
    [{ role: 'agent', id: '../etc' }, /an id must be/],
    [{ role: 'agent', id: 'Z', addresses: ['a,b'] }, /--address must be an IP address or a DNS name/],
    [{ role: 'operator', id: 'bob', addresses: ['10.0.0.1'] }, /client only/],
  ];
  for (const [options, message] of cases) await assert.rejects(issueCertificate(pki, options), (err) => hasCode(err, 'VMF_INVALID_ARGUMENT') && message.test(err.message));
  await assert.rejects(issueCertificate(join(dir, 'nothing'), { role: 'agent', id: 'A' }), (err) => hasCode(err, 'VMF_NOT_FOUND') && /run vmferry pki init/.test(err.message));
});

/** Starts QEMU with one tls-creds-x509 object per endpoint on `identity` and quits it; resolves with its exit code and stderr. */
function qemuLoads(identity: string, endpoints: ('client' | 'server')[]): Promise<{ code: number | null; stderr: string }> {
  const objects = endpoints.flatMap((endpoint) => ['-object', `tls-creds-x509,id=tls-${endpoint},dir=${identity},endpoint=${endpoint},verify-peer=on`]);
  const child = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', ...objects, '-qmp', 'stdio'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  child.stdin.end('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n');
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  return new Promise((done) => {
    child.on('close', (code) => {
      clearTimeout(timer);
      done({ code, stderr });
    });
  });
}

test("QEMU's tls-creds-x509 loads every identity directory as it is", async () => {
  for (const [name, endpoints] of [['agent-A', ['client', 'server']], ['controller', ['client', 'server']], ['storage', ['server']], ['operator-alice', ['client']]] as const) {
    const result = await qemuLoads(join(pki, name), [...endpoints]);
    assert.equal(result.code, 0, `${name}: ${result.stderr}`);
  }
  // The same check fails on a broken file, so the passes above mean something.
  const broken = join(dir, 'broken');
  await rm(broken, { recursive: true, force: true });
  await promisify(execFile)('cp', ['-r', join(pki, 'operator-alice'), broken]);
  await writeFile(join(broken, 'client-cert.pem'), 'not a certificate\n');
  const failed = await qemuLoads(broken, ['client']);
  assert.notEqual(failed.code, 0);
  assert.match(failed.stderr, /client certificate/);
});

test("an agent of `vmferry pki` has the subject a destination's tls-authz is told in advance; any other has not", () => {
  const agent = loadTlsIdentity({ pkiDir: join(pki, 'agent-A') }, 'server') as TlsIdentity;
  assert.equal(peerNamesPredictable(agent, 'A'), true);
  assert.equal(peerNamesPredictable(agent, 'B'), false, 'the certificate of another host id');
  assert.equal(peerNamesPredictable(loadTlsIdentity({ pkiDir: join(pki, 'controller') }, 'server') as TlsIdentity, 'controller'), false, 'another role');
});

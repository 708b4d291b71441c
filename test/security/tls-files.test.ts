// Pointing a daemon or a command at its certificates: each mistake is one clear error naming the file or the option.
import assert from 'node:assert/strict';
import { execFile as execFileCallback } from 'node:child_process';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { initCa, issueCertificate } from '../../src/security/pki.ts';
import { loadTlsIdentity } from '../../src/security/tls-files.ts';

const execFile = promisify(execFileCallback);

let dir: string;
let operator: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmferry-tls-files-'));
  await initCa(join(dir, 'pki'));
  operator = (await issueCertificate(join(dir, 'pki'), { role: 'operator', id: 'alice' })).dir;
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('an identity directory gives the files of the end asked for', () => {
  const client = loadTlsIdentity({ pkiDir: operator }, 'client');
  assert.match(client?.cert ?? '', /BEGIN CERTIFICATE/);
  assert.match(client?.key ?? '', /BEGIN PRIVATE KEY/);
  assert.equal(loadTlsIdentity({}, 'server'), undefined, 'no options: plain HTTP');
});

test('mistakes are named', async () => {
  await writeFile(join(dir, 'junk.pem'), 'hello\n');
  const cert = join(operator, 'client-cert.pem');
  const cases: [Parameters<typeof loadTlsIdentity>, RegExp][] = [
    [[{ pkiDir: operator }, 'server'], /server certificate .*operator-alice\/server-cert.pem: ENOENT.*acts as a server/],
    [[{ pkiDir: operator, cert }, 'client'], /either --pki-dir or --cert\/--key\/--ca, not both/],
    [[{ cert }, 'client'], /--cert, --key and --ca go together/],
    [[{ cert, key: join(dir, 'junk.pem'), ca: cert }, 'client'], /key .*junk.pem is not a PEM file/],
  ];
  for (const [args, message] of cases) assert.throws(() => loadTlsIdentity(...args), (err) => hasCode(err, 'VMF_INVALID_ARGUMENT') && message.test(err.message));
});

test('secure by default: a daemon given no certificates does not start, and says how to give them or --insecure', async () => {
  const cli = fileURLToPath(new URL('../../bin/vmferry.js', import.meta.url));
  const daemons: [string, string[]][] = [
    ['agent', ['--controller', 'http://127.0.0.1:1', 'agent', '--host-id', 'X', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'agent'), '--accel', 'tcg']],
    ['controller', ['controller', '--listen', '127.0.0.1:0', '--db', join(dir, 'controller.db')]],
    ['storage', ['storage', 'serve', '--data-dir', join(dir, 'storage'), '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0']],
  ];
  for (const [daemon, args] of daemons) {
    const refused = await execFile(process.execPath, [cli, ...args], { timeout: 30_000 }).then(() => undefined, (err: { code: number; stderr: string }) => err);
    assert.ok(refused, `vmferry ${daemon} started without certificates`);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, new RegExp(`vmferry ${daemon} serves only with the cluster's certificates: give --pki-dir DIR .*--insecure serves with no TLS`));
    const both = await execFile(process.execPath, [cli, ...args, '--insecure', '--pki-dir', operator], { timeout: 30_000 }).then(() => undefined, (err: { stderr: string }) => err);
    assert.match(both?.stderr ?? 'it started', /--insecure and certificates .* were both given/);
  }
});

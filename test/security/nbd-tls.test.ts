// TLS on the storage server's NBD port: mandatory, with client certificates of
// the cluster's CA and of role agent or controller. Driven by real clients
// (nbdinfo, qemu-img, qemu-io), by vmferry's own client, and by a raw socket
// for what real clients never send; vmferry's client also against nbdkit.
import assert from 'node:assert/strict';
import { execFile as execFileCallback, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { connect as tlsConnect } from 'node:tls';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import pino from 'pino';
import { probeExport } from '../../src/migration/probe.ts';
import type { NbdServerAddress } from '../../src/nbd/address.ts';
import { NbdClient, type NbdClientTls } from '../../src/nbd/client.ts';
import { IHAVEOPT, Option, OptionReply } from '../../src/nbd/constants.ts';
import type { Role } from '../../src/security/identity.ts';
import { initCa, issueCertificate } from '../../src/security/pki.ts';
import { loadTlsIdentity } from '../../src/security/tls-files.ts';
import { writeQemuTlsDir } from '../../src/qemu/tls-creds.ts';
import { inspectSharedBase } from '../../src/storage/disk-images.ts';
import { StorageServer } from '../../src/storage/server.ts';
import { Cleanup } from '../support/cleanup.ts';
import { RawNbdConnection, u32, u64 } from '../support/raw-nbd.ts';
import { makeTempDir } from '../support/temp.ts';

const execFile = promisify(execFileCallback);
const MiB = 1024 * 1024;
const cleanup = new Cleanup();
let dir: string;
let storage: StorageServer;
let port: number;
/** Identity directories (vmferry pki issue's layout, which is also QEMU's and libnbd's). */
const dirs = {} as Record<'agent' | 'controller' | 'operator' | 'rogue' | 'storage', string>;
/** What the storage server logged. */
const logs: { msg: string; peer?: string; problem?: string }[] = [];

before(async () => {
  const temp = await makeTempDir('nbd-tls');
  cleanup.add('temp dir', () => temp.remove());
  dir = temp.path;
  const pki = join(dir, 'pki');
  const rogue = join(dir, 'rogue');
  await initCa(pki);
  await initCa(rogue);
  const issue = async (ca: string, role: Role, id: string): Promise<string> => (await issueCertificate(ca, { role, id })).dir;
  dirs.storage = await issue(pki, 'storage', 'storage');
  dirs.agent = await issue(pki, 'agent', 'A');
  dirs.controller = await issue(pki, 'controller', 'controller');
  dirs.operator = await issue(pki, 'operator', 'alice');
  // The same role and id as a real agent, from a CA the cluster does not know; it trusts the
  // cluster's CA, so that it is the server that refuses it and not the client the server.
  dirs.rogue = join(dir, 'rogue-client');
  const rogueAgent = await issue(rogue, 'agent', 'A');
  await mkdir(dirs.rogue);
  for (const [from, name] of [[pki, 'ca-cert.pem'], [rogueAgent, 'client-cert.pem'], [rogueAgent, 'client-key.pem']] as const) await copyFile(join(from, name), join(dirs.rogue, name));
  storage = await StorageServer.start({
    dataDir: join(dir, 'storage'),
    logger: pino({ level: 'debug' }, { write: (line: string) => void logs.push(JSON.parse(line) as (typeof logs)[number]) }),
    nbd: { host: '127.0.0.1', port: 0 },
    tls: loadTlsIdentity({ pkiDir: dirs.storage }, 'server'),
  });
  cleanup.add('storage server', () => storage.close());
  port = storage.addresses.nbdPort as number;
  await storage.volumes.create('vol', 8 * MiB);
});
after(() => cleanup.run());

const address = (): NbdServerAddress => ({ type: 'inet', host: '127.0.0.1', port });
const clientTls = (identity: string): NbdClientTls => loadTlsIdentity({ pkiDir: identity }, 'client') as NbdClientTls;
const plainUri = (): string => `nbd://127.0.0.1:${port}/vol`;
const tlsUri = (identity: string): string => `nbds://127.0.0.1:${port}/vol?tls-certificates=${identity}`;
/** QEMU tools' TLS client: the object, and the image options naming it. */
const qemuTls = (identity: string): string[] => ['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${identity}`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${port},export=vol,tls-creds=tls0`];

async function fails(file: string, args: string[]): Promise<string> {
  const result = await execFile(file, args, { timeout: 30_000 }).then(
    () => undefined,
    (err: { stderr: string }) => err.stderr,
  );
  assert.ok(result !== undefined, `${file} ${args.join(' ')} succeeded`);
  return result;
}

/** Greeting and client flags by hand; then options one at a time. */
async function rawHandshake(): Promise<RawNbdConnection> {
  const raw = await RawNbdConnection.open(port);
  cleanup.add('raw connection', () => raw.close());
  assert.ok(await raw.read(18), 'greeting');
  raw.write(u32(1));
  return raw;
}

async function rawOption(raw: RawNbdConnection, option: number, data = Buffer.alloc(0)): Promise<number | undefined> {
  raw.write(Buffer.concat([u64(IHAVEOPT), u32(option), u32(data.length), data]));
  const header = await raw.read(20);
  if (!header) return undefined;
  await raw.read(header.readUInt32BE(16));
  return header.readUInt32BE(12);
}

test('an agent\'s certificate: nbdinfo shows the size, qemu-io writes and reads back, the server knows who is attached', async () => {
  const { stdout } = await execFile('nbdinfo', ['--size', tlsUri(dirs.agent)]);
  assert.equal(stdout.trim(), String(8 * MiB));
  await execFile('qemu-io', [...qemuTls(dirs.agent), '-c', 'write -P 0xa5 64k 128k']);
  const { stdout: read } = await execFile('qemu-io', [...qemuTls(dirs.controller), '-c', 'read -P 0xa5 64k 128k']);
  assert.match(read, /read 131072\/131072 bytes/);

  const client = await NbdClient.connect(address(), { exportName: 'vol', tls: clientTls(dirs.agent) });
  assert.deepEqual(await client.read(64 * 1024, 4), Buffer.alloc(4, 0xa5));
  assert.deepEqual(storage.nbd.connections().map((c) => c.peer), ['vmferry:agent:A']);
  await client.close();
});

test('an agent\'s qemu-img probes go under TLS with its QEMU credentials: a destination sees the volume, an overlay\'s base is checked', async () => {
  const tlsDir = await writeQemuTlsDir(loadTlsIdentity({ pkiDir: dirs.agent }, 'server') as NbdClientTls, join(dir, 'agent-qemu-tls'));
  const server = { type: 'inet' as const, host: '127.0.0.1', port };
  assert.equal(await probeExport(server, 'vol', tlsDir), 8 * MiB);
  assert.equal(await probeExport(server, 'vol'), undefined, 'without credentials the volume is out of reach');
  assert.deepEqual(await inspectSharedBase({ server, export: 'vol' }, tlsDir), { virtualSize: 8 * MiB });
});

test('a plaintext client is refused: nbdinfo, qemu-img and vmferry\'s client', async () => {
  await fails('nbdinfo', [plainUri()]);
  assert.match(await fails('qemu-img', ['info', plainUri()]), /TLS negotiation required[\s\S]*server reported: this server requires TLS/);
  await assert.rejects(NbdClient.connect(address(), { exportName: 'vol' }), /NBD_REP_ERR_TLS_REQD/);
});

test('a certificate of another CA is refused, even with an agent\'s identity; the log says whose it was', async () => {
  logs.length = 0;
  // (QEMU's tools do not get as far: they refuse to load a certificate their own CA file does not vouch for.)
  await fails('nbdinfo', ['--size', tlsUri(dirs.rogue)]);
  await assert.rejects(NbdClient.connect(address(), { exportName: 'vol', tls: clientTls(dirs.rogue) }), (err: { code: string }) => ['VMF_NBD_CLOSED', 'VMF_NBD_REFUSED'].includes(err.code));
  const refusals = logs.filter((l) => l.msg === 'NBD client refused at the TLS handshake');
  assert.equal(refusals.length, 2, JSON.stringify(logs));
  for (const refusal of refusals) assert.match(refusal.problem ?? '', /client certificate refused .*subject "O=vmferry,OU=agent,CN=A"/);
});

test('an operator\'s certificate of the cluster\'s CA is refused by its role', async () => {
  logs.length = 0;
  assert.match(await fails('nbdinfo', ['--size', tlsUri(dirs.operator)]), /server policy prevents NBD_OPT_GO/);
  await assert.rejects(NbdClient.connect(address(), { exportName: 'vol', tls: clientTls(dirs.operator) }), /NBD_REP_ERR_POLICY \(vmferry:operator:alice may not open volumes/);
  assert.deepEqual(logs.filter((l) => l.msg.startsWith('NBD client refused')).map((l) => l.peer), ['vmferry:operator:alice', 'vmferry:operator:alice']);
});

test('before TLS only STARTTLS and ABORT are answered; EXPORT_NAME hangs up; STARTTLS twice is an error', async () => {
  const listing = await rawHandshake();
  assert.equal(await rawOption(listing, Option.LIST), OptionReply.ERR_TLS_REQD);
  assert.equal(await rawOption(listing, Option.ABORT), OptionReply.ACK);

  const named = await rawHandshake();
  named.write(Buffer.concat([u64(IHAVEOPT), u32(Option.EXPORT_NAME), u32(3), Buffer.from('vol')]));
  assert.equal(await named.read(1), undefined, 'the server hung up instead of exporting');

  const twice = await rawHandshake();
  assert.equal(await rawOption(twice, Option.STARTTLS), OptionReply.ACK);
  const identity = clientTls(dirs.agent);
  const secure = tlsConnect({ socket: twice.socket, ca: identity.ca, cert: identity.cert, key: identity.key, host: '127.0.0.1' });
  cleanup.add('tls connection', () => secure.destroy());
  await new Promise((resolve, reject) => secure.once('secureConnect', resolve).once('error', reject));
  const header = new Promise<Buffer>((resolve) => {
    let got = Buffer.alloc(0);
    secure.on('data', (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      if (got.length >= 20) resolve(got);
    });
  });
  secure.write(Buffer.concat([u64(IHAVEOPT), u32(Option.STARTTLS), u32(0)]));
  assert.equal((await header).readUInt32BE(12), OptionReply.ERR_INVALID);
});

test('half-done and garbled TLS handshakes do not stop the server serving others', async () => {
  // STARTTLS, then no TLS hello: garbage, or nothing and a hang-up.
  const garbled = await rawHandshake();
  assert.equal(await rawOption(garbled, Option.STARTTLS), OptionReply.ACK);
  garbled.write(Buffer.alloc(512, 0x42));
  const silent = await rawHandshake();
  assert.equal(await rawOption(silent, Option.STARTTLS), OptionReply.ACK);
  silent.close();
  assert.equal(await garbled.read(1, 10_000), undefined, 'the server dropped the garbled handshake');

  const client = await NbdClient.connect(address(), { exportName: 'vol', tls: clientTls(dirs.controller) });
  await client.write(0, Buffer.alloc(4096, 7));
  assert.deepEqual(await client.read(0, 4096), Buffer.alloc(4096, 7));
  await client.close();
});

test('vmferry\'s client with TLS against nbdkit --tls=require', async () => {
  const socket = join(dir, 'nbdkit.sock');
  // Written once nbdkit accepts connections; the socket file appears at bind, before listen.
  const pidFile = join(dir, 'nbdkit.pid');
  // nbdkit reads ca-cert.pem, server-cert.pem and server-key.pem: a storage identity directory.
  const child = spawn('nbdkit', ['-f', '-U', socket, '-P', pidFile, '--tls=require', `--tls-certificates=${dirs.storage}`, '--tls-verify-peer', 'memory', '4M'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  cleanup.add('nbdkit', async () => {
    if (child.exitCode === null) child.kill('SIGTERM');
    await exited;
  });
  for (let i = 0; i < 200 && !existsSync(pidFile); i++) await sleep(25);
  const client = await NbdClient.connect({ type: 'unix', path: socket }, { tls: { ...clientTls(dirs.agent), hostname: '127.0.0.1' } });
  assert.equal(client.size, 4 * MiB);
  await client.write(0, Buffer.alloc(512, 3));
  assert.deepEqual(await client.read(0, 512), Buffer.alloc(512, 3));
  await client.close();
  await assert.rejects(NbdClient.connect({ type: 'unix', path: socket }), /TLS/);
});

// NBD fuzzing against the real storage server, run as users run it (the CLI,
// in its own process, so its RSS is its own): random handshakes, mutated
// request streams checked against a model of what the protocol says each
// request must get, and connections dropped mid-way. After each campaign the
// server must still serve a clean client the bytes it was given, hold no
// leftover connection, have grown no file, and have kept its memory bounded.
//
// Reproduce a run with FUZZ_SEED=<seed printed by the test>; FUZZ_SCALE=<n>
// multiplies every campaign's case count and time budget.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile as execFileCallback } from 'node:child_process';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/nbd/client.ts';
import { findFreePort } from '../../src/util/ports.ts';
import { recordReliability } from '../support/reliability.ts';
import { makeTempDir } from '../support/temp.ts';
import { Daemon } from './daemon.ts';
import { FuzzSocket } from './fuzz-socket.ts';
import { fuzzSeed, Rng } from './prng.ts';

const execFile = promisify(execFileCallback);
const seed = fuzzSeed();
const scale = Number(process.env.FUZZ_SCALE ?? 1) || 1;
const size = 8 * 1024 * 1024;
const maxBlock = 32 * 1024 * 1024;
const rssBoundMiB = 64;
/** The server's per-connection limit on bytes being executed (src/nbd/server.ts defaultLimits.maxInFlightBytes). */
const inFlightLimitMiB = 32;
/** What all connections together may hold (--memory-budget-mib): half the default, so the flood below is held well short of its ~750 MiB. */
const memoryBudgetMiB = 128;
const requestConcurrency = 4;

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const [READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS] = [0, 1, 2, 3, 4, 6, 7];
const [FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO] = [1, 2, 4, 8, 16];
const [EPERM, EINVAL, ENOSPC, ENOTSUP] = [1, 22, 28, 95];
const commandFlags: Record<number, number> = { [READ]: DF, [WRITE]: FUA, [DISC]: 0, [FLUSH]: 0, [TRIM]: FUA, [WRITE_ZEROES]: FUA | NO_HOLE | FAST_ZERO, [BLOCK_STATUS]: REQ_ONE };

let dir: { path: string; remove(): Promise<void> };
let server: Daemon | undefined;
let nbdPort: number;
let adminUrl: string;
let keepDigest: string;

const u32 = (value: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
};
const u16 = (value: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value & 0xffff);
  return b;
};
const u64 = (value: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, value));
  return b;
};
const option = (opt: number, data: Buffer, magic = IHAVEOPT, length = data.length): Buffer => Buffer.concat([u64(magic), u32(opt), u32(length), data]);
const nbdString = (s: Buffer): Buffer => Buffer.concat([u32(s.length), s]);
const goData = (name: Buffer, infos: number[] = []): Buffer => Buffer.concat([nbdString(name), u16(infos.length), ...infos.map(u16)]);

async function admin<T>(method: string, path: string, body?: unknown): Promise<T> {
  const response = await fetch(`${adminUrl}${path}`, {
    method,
    signal: AbortSignal.timeout(10_000),
    ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${path}: HTTP ${response.status} ${text}`);
  return (text ? JSON.parse(text) : undefined) as T;
}

async function readAll(exportName: string): Promise<Buffer> {
  const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: nbdPort }, { exportName, timeoutMs: 15_000 });
  try {
    return await client.read(0, client.size);
  } finally {
    await client.close();
  }
}

const digest = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

/** Splits bytes at random points, so the server sees every framing a TCP stream can produce. */
function pieces(rng: Rng, data: Buffer): Buffer[] {
  if (data.length < 2 || rng.chance(0.5)) return [data];
  const out: Buffer[] = [];
  let at = 0;
  while (at < data.length) {
    const step = rng.int(1, Math.max(1, Math.min(data.length - at, rng.chance(0.3) ? 7 : 4096)));
    out.push(data.subarray(at, at + step));
    at += step;
  }
  return out;
}

interface CampaignResult {
  cases: number;
  failures: string[];
  notes: Map<string, number>;
}

/** Runs `runCase(i)` for i = 0… with `concurrency` at a time until `maxCases` or `budgetMs` is reached. */
async function campaign(maxCases: number, budgetMs: number, concurrency: number, runCase: (i: number, note: (what: string) => void) => Promise<string | undefined>): Promise<CampaignResult> {
  const result: CampaignResult = { cases: 0, failures: [], notes: new Map() };
  const stopAt = Date.now() + budgetMs * scale;
  const limit = Math.round(maxCases * scale);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < limit && Date.now() < stopAt && result.failures.length < 20) {
      const i = next++;
      const note = (what: string): void => void result.notes.set(what, (result.notes.get(what) ?? 0) + 1);
      try {
        const failure = await runCase(i, note);
        if (failure) result.failures.push(`case ${i}: ${failure}`);
      } catch (err) {
        result.failures.push(`case ${i}: ${err instanceof Error ? err.stack : String(err)}`);
      }
      result.cases++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return result;
}

function summary(result: CampaignResult): string {
  return [...result.notes.entries()].sort((a, b) => b[1] - a[1]).map(([what, n]) => `${n} ${what}`).join(', ');
}

/** The health checks every campaign ends with; returns what was measured for the tally. */
async function assertHealthy(what: string, rssBefore: number, allowanceMiB = 0): Promise<{ rss: number }> {
  assert.ok(server?.alive, `the storage server exited during ${what}:\n${server?.log()}`);
  // Every fuzz connection is gone from the server's side too (the checker's own NBD client comes later).
  let connections: unknown[] = [];
  for (let i = 0; i < 100; i++) {
    connections = await admin<unknown[]>('GET', '/v1/connections');
    if (connections.length === 0) break;
    await sleep(100);
  }
  assert.deepEqual(connections, [], `connections left after ${what}`);
  const volumes = await admin<{ name: string; sizeBytes: number; attachments: string[] }[]>('GET', '/v1/volumes');
  assert.deepEqual(volumes.map((v) => [v.name, v.sizeBytes, v.attachments.length]), [['fuzz', size, 0], ['keep', size, 0], ['ro', size, 0]]);
  // Nothing grew a volume file or created another one.
  const files = (await readdir(join(dir.path, 'data', 'volumes'))).sort();
  assert.deepEqual(files, ['fuzz.raw', 'keep.raw', 'ro.raw'], `volume files after ${what}`);
  for (const file of files) assert.equal((await stat(join(dir.path, 'data', 'volumes', file))).size, size, `${file} size after ${what}`);
  assert.equal(digest(await readAll('keep')), keepDigest, `the good client's data changed during ${what}`);
  assert.equal(digest(await readAll('ro')), digest(Buffer.alloc(size)), `the read-only volume changed during ${what}`);
  const rss = server.rssMiB();
  assert.ok(rss - rssBefore < rssBoundMiB + allowanceMiB, `RSS grew from ${rssBefore.toFixed(0)} to ${rss.toFixed(0)} MiB during ${what} (bound ${rssBoundMiB + allowanceMiB} MiB)`);
  return { rss };
}

before(async () => {
  console.log(`# NBD fuzz seed ${seed} (rerun with FUZZ_SEED=${seed})`);
  dir = await makeTempDir('nbd-fuzz');
  nbdPort = await findFreePort('127.0.0.1');
  const adminPort = await findFreePort('127.0.0.1');
  adminUrl = `http://127.0.0.1:${adminPort}`;
  server = await Daemon.start(
    'storage server',
    ['storage', 'serve', '--data-dir', join(dir.path, 'data'), '--listen', `127.0.0.1:${nbdPort}`, '--admin', `127.0.0.1:${adminPort}`, '--memory-budget-mib', String(memoryBudgetMiB), '--insecure'],
    async () => (await fetch(`${adminUrl}/v1/volumes`, { signal: AbortSignal.timeout(2_000) })).ok,
  );
  await admin('POST', '/v1/volumes', { name: 'keep', sizeBytes: size });
  await admin('POST', '/v1/volumes', { name: 'fuzz', sizeBytes: size });
  await admin('POST', '/v1/volumes', { name: 'ro', sizeBytes: size, readOnly: true });
  // The good client's data: random bytes, flushed, then checksummed after every campaign.
  const data = new Rng(seed, 'keep').bytes(size);
  const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: nbdPort }, { exportName: 'keep', timeoutMs: 15_000 });
  await client.write(0, data);
  await client.flush();
  await client.close();
  keepDigest = digest(data);
  assert.equal(digest(await readAll('keep')), keepDigest);
});

after(async () => {
  await server?.stop();
  await dir?.remove();
});

// ---- Campaign 1: the handshake ----------------------------------------------

/**
 * What the server must answer to the options we send, by parsing our own
 * bytes as the protocol says the server must: one reply sequence per complete
 * option ending in ACK or an error, a hang-up where the protocol says so, and
 * no opinion once an export is attached or the server is (rightly) waiting for
 * more bytes.
 */
function expectedOptionReplies(bytes: Buffer): { options: number[]; end: 'close' | 'wait' | 'attached' } {
  if (bytes.length < 4) return { options: [], end: 'wait' };
  const flags = bytes.readUInt32BE(0);
  if (!(flags & 1) || flags & ~3) return { options: [], end: 'close' };
  const options: number[] = [];
  let at = 4;
  for (;;) {
    if (bytes.length - at < 16) return { options, end: 'wait' };
    const magic = bytes.readBigUInt64BE(at);
    const opt = bytes.readUInt32BE(at + 8);
    const length = bytes.readUInt32BE(at + 12);
    at += 16;
    if (magic !== IHAVEOPT) return { options, end: 'close' };
    if (length > 64 * 1024 && opt === 1) return { options, end: 'close' };
    if (bytes.length - at < length) return { options, end: 'wait' };
    const data = bytes.subarray(at, at + length);
    at += length;
    if (length > 64 * 1024) {
      options.push(opt);
      continue;
    }
    if (opt === 1) return { options, end: ['fuzz', 'ro', 'keep'].includes(data.toString('utf8')) ? 'attached' : 'close' };
    if (opt === 2) {
      options.push(opt);
      return { options, end: 'close' };
    }
    if (opt === 7 && length >= 4) {
      const nameLength = data.readUInt32BE(0);
      const name = 4 + nameLength <= length ? data.toString('utf8', 4, 4 + nameLength) : undefined;
      const countAt = 4 + nameLength;
      const wellFormed = countAt + 2 <= length && countAt + 2 + data.readUInt16BE(countAt) * 2 === length;
      if (wellFormed && name !== undefined && ['fuzz', 'ro', 'keep'].includes(name)) return { options, end: 'attached' };
    }
    options.push(opt);
  }
}

/** Reads option replies for `expected` options; returns a problem or undefined. */
async function checkOptionReplies(c: FuzzSocket, expected: number[], deadline: number): Promise<string | undefined> {
  for (const [index, opt] of expected.entries()) {
    for (;;) {
      const header = await c.read(20, deadline);
      if (!header) return `no final reply to option #${index} (${opt})${c.closedByPeer ? ': the server hung up' : ': timed out'}`;
      if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) return `option reply without its magic: ${header.toString('hex')}`;
      const replyOption = header.readUInt32BE(8);
      const type = header.readUInt32BE(12);
      const length = header.readUInt32BE(16);
      if (replyOption !== opt) return `reply for option ${replyOption} while option ${opt} was pending`;
      if (length > 16 * 1024 * 1024) return `option reply of ${length} bytes`;
      const body = await c.read(length, deadline);
      if (!body) return `option reply body cut off (${length} bytes announced)`;
      if (type === 1) break;
      if (type >= 2 ** 31) {
        if (length === 0) return `error ${type} for option ${opt} without a message`;
        break;
      }
    }
  }
  return undefined;
}

test('handshake: random bytes and mutated option streams get option errors or a clean hang-up', { timeout: 60_000 }, async () => {
  const exportNames = [Buffer.from('fuzz'), Buffer.from('ro'), Buffer.from(''), Buffer.from('../keep'), Buffer.from('keep\0'), Buffer.from('x'.repeat(5000)), Buffer.from('%2e%2e'), Buffer.from([0xff, 0xfe, 0x00])];
  const rssBefore = server?.rssMiB() ?? 0;
  const result = await campaign(1500, 12_000, 8, async (i, note) => {
    const rng = new Rng(seed, 'handshake', i);
    const c = await FuzzSocket.open(nbdPort);
    try {
      const deadline = Date.now() + 10_000;
      const greeting = await c.read(18, deadline);
      if (!greeting || greeting.readBigUInt64BE(0) !== NBDMAGIC) return `bad greeting ${greeting?.toString('hex')}`;
      let stream: Buffer;
      if (rng.chance(0.25)) {
        stream = rng.bytes(rng.int(1, 2048));
        note('random byte streams');
      } else {
        // Valid client flags (mostly), then options: mostly well-formed, each possibly mutated.
        const parts: Buffer[] = [u32(rng.chance(0.9) ? rng.pick([1, 3]) : rng.u32())];
        const count = rng.int(1, 6);
        for (let k = 0; k < count; k++) {
          const opt = rng.chance(0.85) ? rng.pick([1, 2, 3, 5, 6, 7, 8, 9, 10]) : rng.u32();
          const name = rng.pick(exportNames);
          let data: Buffer;
          if (opt === 6 || opt === 7) data = goData(name, rng.chance(0.3) ? [rng.int(0, 5), rng.int(0, 0xffff)] : []);
          else if (opt === 9 || opt === 10) data = Buffer.concat([nbdString(name), u32(1), nbdString(Buffer.from(rng.pick(['base:allocation', 'base:', 'qemu:dirty-bitmap:x', ''])))]);
          else if (opt === 1) data = name;
          else data = Buffer.alloc(0);
          const mutation = rng.int(0, 9);
          let magic = IHAVEOPT;
          let length = data.length;
          if (mutation === 0) magic = IHAVEOPT ^ BigInt(1 + rng.int(0, 62));
          else if (mutation === 1) length = rng.pick([data.length + rng.int(1, 64), Math.max(0, data.length - rng.int(1, 8)), 64 * 1024 + 1, 0xffffffff]);
          else if (mutation === 2) data = rng.bytes(rng.int(0, 300));
          else if (mutation === 3 && data.length > 0) data = Buffer.concat([data.subarray(0, rng.int(0, data.length - 1)), rng.bytes(rng.int(0, 8))]);
          if (mutation === 2 || mutation === 3) length = rng.chance(0.8) ? data.length : rng.int(0, 400);
          parts.push(option(opt, data, magic, length));
        }
        stream = Buffer.concat(parts);
        note('option streams');
      }
      c.write(...pieces(rng, stream));
      const expected = expectedOptionReplies(stream);
      const problem = await checkOptionReplies(c, expected.options, deadline);
      if (problem) return `${problem} (stream ${stream.subarray(0, 96).toString('hex')})`;
      if (expected.end === 'close') {
        if (!(await c.waitClosed(deadline))) return `the server did not hang up (stream ${stream.subarray(0, 96).toString('hex')})`;
        note('hung up on as the protocol says');
      } else if (expected.end === 'attached') {
        note('attached to an export');
      } else {
        note('server waiting for more bytes when we left');
      }
      return undefined;
    } finally {
      c.destroy(rng.chance(0.3));
    }
  });
  const { rss } = await assertHealthy('the handshake campaign', rssBefore);
  const ok = result.failures.length === 0;
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'NBD',
    tried: `${result.cases} handshakes with random bytes or mutated options (bad magic, wrong lengths, unknown options, odd export names such as ../keep, NUL, 5000 chars), seed ${seed}`,
    observed: `${ok ? 'every complete option got its reply ending in ACK or an error with a message; hang-ups only where the protocol says' : `${result.failures.length} cases failed: ${result.failures[0]}`} (${summary(result)}); server kept serving, data intact, RSS ${rssBefore.toFixed(0)}→${rss.toFixed(0)} MiB`,
    ok,
  });
  assert.deepEqual(result.failures, []);
});

// ---- Campaign 2: requests after a valid handshake ---------------------------

interface Session {
  c: FuzzSocket;
  exportName: 'fuzz' | 'ro';
  structured: boolean;
  metaContext: boolean;
}

/** A real handshake (GO), optionally with structured replies and base:allocation. */
async function attach(rng: Rng, deadline: number): Promise<Session | string> {
  const c = await FuzzSocket.open(nbdPort);
  const exportName = rng.chance(0.8) ? 'fuzz' : 'ro';
  const structured = rng.chance(0.5);
  const metaContext = structured && rng.chance(0.7);
  await c.read(18, deadline);
  const stream: Buffer[] = [u32(3)];
  const expected: number[] = [];
  if (structured) {
    stream.push(option(8, Buffer.alloc(0)));
    expected.push(8);
  }
  if (metaContext) {
    stream.push(option(10, Buffer.concat([nbdString(Buffer.from(exportName)), u32(1), nbdString(Buffer.from('base:allocation'))])));
    expected.push(10);
  }
  stream.push(option(7, goData(Buffer.from(exportName), [3])));
  expected.push(7);
  c.write(Buffer.concat(stream));
  const problem = await checkOptionReplies(c, expected, deadline);
  if (problem) {
    c.destroy();
    return `handshake: ${problem}`;
  }
  return { c, exportName, structured, metaContext };
}

interface Request {
  magic: number;
  flags: number;
  type: number;
  handle: bigint;
  offset: bigint;
  length: number;
  payload?: Buffer;
}

function encode(r: Request): Buffer {
  const header = Buffer.alloc(28);
  header.writeUInt32BE(r.magic >>> 0, 0);
  header.writeUInt16BE(r.flags, 4);
  header.writeUInt16BE(r.type, 6);
  header.writeBigUInt64BE(r.handle, 8);
  header.writeBigUInt64BE(BigInt.asUintN(64, r.offset), 16);
  header.writeUInt32BE(r.length >>> 0, 24);
  return r.payload ? Buffer.concat([header, r.payload]) : header;
}

/** The protocol's answer to a well-framed request: an errno (0 = success), or 'disc'. */
function expectedErrno(r: Request, s: Session): number | 'disc' {
  const allowed = commandFlags[r.type];
  if (allowed === undefined || r.flags & ~allowed) return EINVAL;
  if (r.type === DISC || r.type === FLUSH) return r.offset === 0n && r.length === 0 ? (r.type === DISC ? 'disc' : 0) : EINVAL;
  const writing = r.type === WRITE || r.type === TRIM || r.type === WRITE_ZEROES;
  if (writing && s.exportName === 'ro') return EPERM;
  if (r.type === BLOCK_STATUS && !s.metaContext) return EINVAL;
  if ((r.type === READ || r.type === WRITE) && r.length > maxBlock) return EINVAL;
  // nbdkit's rule too: a zero-length range is invalid for every ranged command.
  if (r.length === 0) return EINVAL;
  if (r.offset + BigInt(r.length) > BigInt(size)) return r.type === WRITE || r.type === WRITE_ZEROES ? ENOSPC : EINVAL;
  if (r.type === WRITE_ZEROES && r.flags & FAST_ZERO) return ENOTSUP;
  return 0;
}

function validRequest(rng: Rng, handle: bigint): Request {
  const type = rng.pick([READ, READ, WRITE, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS]);
  const aligned = rng.chance(0.7);
  const offset = aligned ? rng.int(0, size / 512 - 1) * 512 : rng.int(0, size - 1);
  const length = Math.min(size - offset, aligned ? rng.int(1, 128) * 512 : rng.int(1, 65536));
  const flags = rng.chance(0.3) ? (commandFlags[type] as number) & rng.int(0, 31) & ~FAST_ZERO : 0;
  if (type === FLUSH) return { magic: REQUEST_MAGIC, flags: 0, type, handle, offset: 0n, length: 0 };
  return { magic: REQUEST_MAGIC, flags, type, handle, offset: BigInt(offset), length };
}

/** Mutates header fields; the request stays framed (a WRITE carries exactly `length` payload bytes). */
function mutate(rng: Rng, r: Request, note: (what: string) => void): void {
  const mutations = rng.int(1, 2);
  for (let m = 0; m < mutations; m++) {
    switch (rng.int(0, 6)) {
      case 0:
        r.type = rng.chance(0.5) ? rng.pick([5, 8, 9, 15, 255, 0xffff]) : rng.int(8, 0xffff);
        note('unknown command');
        break;
      case 1:
        r.flags = rng.chance(0.5) ? 1 << rng.int(0, 15) : rng.int(0, 0xffff);
        note('random flags');
        break;
      case 2:
        r.offset = BigInt(size - rng.pick([0, 1, 511, 512, 4096]));
        note('offset at or near the end');
        break;
      case 3:
        r.offset = rng.pick([2n ** 63n, 2n ** 64n - 1n, 2n ** 53n + 1n, BigInt(size) * 1000n, 2n ** 64n - BigInt(rng.int(1, 4096))]);
        note('huge offset');
        break;
      case 4:
        r.length = 0;
        note('zero length');
        break;
      case 5:
        r.length = r.type === WRITE ? rng.int(size - 4096, size + 65536) % (256 * 1024) : rng.pick([maxBlock + 1, 0xffffffff, size + 1, 2 ** 31, size]);
        note('odd or huge length');
        break;
      case 6:
        if (r.type === FLUSH || r.type === DISC) {
          r.offset = BigInt(rng.int(1, 4096));
          r.length = rng.int(0, 4096) & ~1023;
          note('FLUSH with offset');
        } else {
          r.type = DISC;
          r.offset = BigInt(rng.int(0, 1)) * 512n;
          r.length = rng.chance(0.5) ? 0 : 512;
          r.flags = 0;
          note('DISC with a range');
        }
        break;
    }
  }
}

interface Pending {
  request: Request;
  expect: number;
  errno: number | undefined;
  done: boolean;
}

/** Parses replies until every pending request is answered (or the deadline); returns a problem or undefined. */
async function collectReplies(s: Session, pending: Map<bigint, Pending>, deadline: number): Promise<string | undefined> {
  const open = (): number => [...pending.values()].filter((p) => !p.done).length;
  while (open() > 0) {
    const head = await s.c.read(4, deadline);
    if (!head) return `${open()} requests unanswered (${s.c.closedByPeer ? 'server hung up' : 'timed out'}): ${[...pending.values()].filter((p) => !p.done).map((p) => `type ${p.request.type} flags ${p.request.flags} off ${p.request.offset} len ${p.request.length}`).slice(0, 3).join('; ')}`;
    const magic = head.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await s.c.read(12, deadline);
      if (!rest) return 'simple reply cut off';
      const handle = rest.readBigUInt64BE(4);
      const p = pending.get(handle);
      if (!p || p.done) return `reply for unknown or answered handle ${handle}`;
      if (s.structured) return 'simple reply after structured replies were negotiated';
      p.errno = rest.readUInt32BE(0);
      p.done = true;
      if (p.errno === 0 && p.request.type === READ && !(await s.c.read(p.request.length, deadline))) return 'read data cut off';
    } else if (magic === STRUCTURED_REPLY_MAGIC) {
      const rest = await s.c.read(16, deadline);
      if (!rest) return 'structured reply cut off';
      const flags = rest.readUInt16BE(0);
      const type = rest.readUInt16BE(2);
      const handle = rest.readBigUInt64BE(4);
      const length = rest.readUInt32BE(12);
      const p = pending.get(handle);
      if (!p || p.done) return `chunk for unknown or answered handle ${handle}`;
      if (!s.structured) return 'structured reply without negotiation';
      const body = length ? await s.c.read(length, deadline) : Buffer.alloc(0);
      if (!body) return 'chunk payload cut off';
      if (type === 0x8001 || type === 0x8002) {
        p.errno = body.readUInt32BE(0);
        if (body.readUInt16BE(4) === 0) return `error chunk without a message (errno ${p.errno})`;
      } else if (type === 5) {
        // base:allocation: the protocol wants at least one extent, none of length 0, none past the request.
        const extents = (body.length - 4) / 8;
        if (extents < 1 || !Number.isInteger(extents)) return `block status of ${body.length} bytes`;
        for (let e = 0; e < extents; e++) {
          if (body.readUInt32BE(4 + e * 8) === 0) return `block status extent ${e} of length 0 (request length ${p.request.length})`;
        }
        if (p.request.flags & REQ_ONE && extents !== 1) return `REQ_ONE got ${extents} extents`;
      } else if (type === 1) {
        if (length !== 8 + p.request.length) return `read chunk of ${length} bytes for ${p.request.length}`;
      } else if (type !== 0 && type !== 2) {
        return `unknown chunk type ${type}`;
      }
      if (flags & 1) {
        p.errno ??= 0;
        p.done = true;
      }
    } else {
      return `reply with magic 0x${magic.toString(16)}`;
    }
  }
  for (const p of pending.values()) {
    if (p.errno !== p.expect) {
      const r = p.request;
      return `type ${r.type} flags 0x${r.flags.toString(16)} offset ${r.offset} length ${r.length} on ${s.exportName}${s.metaContext ? ' (meta)' : ''}: errno ${p.errno}, expected ${p.expect}`;
    }
  }
  return undefined;
}

test('requests: mutated request streams get the protocol\'s error, or a hang-up where it says so', { timeout: 60_000 }, async () => {
  const rssBefore = server?.rssMiB() ?? 0;
  const result = await campaign(2000, 15_000, requestConcurrency, async (i, note) => {
    const rng = new Rng(seed, 'requests', i);
    const deadline = Date.now() + 20_000;
    const session = await attach(rng, deadline);
    if (typeof session === 'string') return session;
    const { c } = session;
    try {
      const pending = new Map<bigint, Pending>();
      const out: Buffer[] = [];
      const count = rng.int(1, 30);
      let handle = BigInt(i) << 20n;
      for (let k = 0; k < count; k++) {
        const r = validRequest(rng, ++handle);
        if (rng.chance(0.5)) mutate(rng, r, note);
        if (r.type === WRITE) r.payload = rng.bytes(r.length);
        const expect = expectedErrno(r, session);
        if (expect === 'disc') continue;
        pending.set(r.handle, { request: r, expect, errno: undefined, done: false });
        out.push(encode(r));
      }
      // The tail: the one thing that may end the connection or leave the server waiting for bytes.
      const tail = rng.pick(['none', 'none', 'bad-magic', 'huge-write', 'disc-then-more', 'cut-header', 'cut-write', 'garbage'] as const);
      let expectClose = false;
      const tailRequest = validRequest(rng, ++handle);
      switch (tail) {
        case 'bad-magic':
          out.push(encode({ ...tailRequest, payload: undefined, magic: REQUEST_MAGIC ^ (1 << rng.int(0, 31)) }));
          expectClose = true;
          break;
        case 'huge-write':
          out.push(encode({ ...tailRequest, type: WRITE, offset: 0n, length: rng.int(maxBlock + 1, 0xffffffff), payload: rng.bytes(rng.int(0, 4096)) }));
          expectClose = true;
          break;
        case 'disc-then-more':
          out.push(encode({ magic: REQUEST_MAGIC, flags: 0, type: DISC, handle: ++handle, offset: 0n, length: 0 }));
          for (let k = rng.int(1, 5); k > 0; k--) out.push(encode({ ...validRequest(rng, ++handle), type: READ, flags: 0, offset: 0n, length: 512 }));
          expectClose = true;
          break;
        case 'cut-header':
          out.push(encode({ ...tailRequest, payload: undefined }).subarray(0, rng.int(1, 27)));
          break;
        case 'cut-write': {
          const length = rng.int(4096, 256 * 1024);
          out.push(encode({ ...tailRequest, type: WRITE, flags: 0, offset: 0n, length, payload: rng.bytes(rng.int(0, length - 1)) }));
          break;
        }
        case 'garbage': {
          const garbage = rng.bytes(rng.int(1, 512));
          out.push(garbage);
          expectClose = garbage.length >= 28 && garbage.readUInt32BE(0) !== REQUEST_MAGIC;
          break;
        }
      }
      note(`tail: ${tail}`);
      c.write(...pieces(rng, Buffer.concat(out)));
      const problem = await collectReplies(session, pending, deadline);
      if (problem) return problem;
      if (expectClose && !(await c.waitClosed(deadline))) return `the server did not hang up after tail ${tail}`;
      return undefined;
    } finally {
      c.destroy(rng.chance(0.3));
    }
  });
  const { rss } = await assertHealthy('the request campaign', rssBefore, requestConcurrency * inFlightLimitMiB);
  const ok = result.failures.length === 0;
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'NBD',
    tried: `${result.cases} attached connections sending up to 30 requests each, half mutated (unknown commands, random flags, offsets at/past the end and up to 2^64-1, zero and huge lengths, DISC/FLUSH with ranges), ending in a wrong magic, an oversized write, requests after DISC, a cut-off header or write, or garbage; seed ${seed}`,
    observed: `${ok ? 'every request got exactly the protocol\'s errno (EINVAL/EPERM/ENOSPC/ENOTSUP or success), error chunks carried a message, hang-ups only on wrong magic, oversized write, DISC or garbage' : `${result.failures.length} cases failed: ${result.failures[0]}`}; server kept serving, data intact, RSS ${rssBefore.toFixed(0)}→${rss.toFixed(0)} MiB (bound: 64 MiB + ${requestConcurrency} connections × ${inFlightLimitMiB} MiB in flight)`,
    ok,
  });
  assert.deepEqual(result.failures, []);
});

// ---- Campaign 3: connections dropped at any point ---------------------------

test('drops: connections reset or closed mid-handshake and mid-request leave nothing behind', { timeout: 60_000 }, async () => {
  const rssBefore = server?.rssMiB() ?? 0;
  const result = await campaign(1500, 12_000, 16, async (i, note) => {
    const rng = new Rng(seed, 'drops', i);
    const deadline = Date.now() + 10_000;
    const stage = rng.pick(['connect', 'greeting', 'mid-option', 'mid-header', 'mid-write', 'unread-reads', 'in-flight-writes'] as const);
    note(stage);
    if (stage === 'connect' || stage === 'greeting' || stage === 'mid-option') {
      const c = await FuzzSocket.open(nbdPort);
      if (stage !== 'connect') await c.read(18, deadline);
      if (stage === 'mid-option') {
        const go = Buffer.concat([u32(3), option(7, goData(Buffer.from('fuzz'), [3]))]);
        c.write(go.subarray(0, rng.int(1, go.length - 1)));
        await sleep(rng.int(0, 20));
      }
      c.destroy(rng.chance(0.5));
      return undefined;
    }
    const session = await attach(rng, deadline);
    if (typeof session === 'string') return session;
    const { c } = session;
    const request = (type: number, length: number, offset = 0): Buffer =>
      encode({ magic: REQUEST_MAGIC, flags: 0, type, handle: BigInt(rng.u32()), offset: BigInt(offset), length });
    if (stage === 'mid-header') c.write(request(READ, 4096).subarray(0, rng.int(1, 27)));
    if (stage === 'mid-write') c.write(request(WRITE, 1024 * 1024), rng.bytes(rng.int(0, 1024 * 1024 - 1)));
    if (stage === 'unread-reads') c.write(Buffer.concat(Array.from({ length: rng.int(1, 4) }, () => request(READ, 1024 * 1024, rng.int(0, 7) * 1024 * 1024))));
    if (stage === 'in-flight-writes' && session.exportName === 'fuzz') {
      for (let k = rng.int(1, 8); k > 0; k--) c.write(request(WRITE, 65536, rng.int(0, 127) * 65536), rng.bytes(65536));
    }
    await sleep(rng.int(0, 30));
    c.destroy(rng.chance(0.5));
    return undefined;
  });
  const { rss } = await assertHealthy('the drop campaign', rssBefore);
  const ok = result.failures.length === 0;
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'NBD',
    tried: `${result.cases} connections closed or reset (RST) at random points: before the greeting, mid-option, mid-header, mid-1 MiB-write, with up to 4 unread 1 MiB reads or 8 writes in flight; 16 at a time; seed ${seed}`,
    observed: `${ok ? 'no connection or attachment left behind' : `${result.failures.length} cases failed: ${result.failures[0]}`} (${summary(result)}); server kept serving, data intact, no volume file grew, RSS ${rssBefore.toFixed(0)}→${rss.toFixed(0)} MiB`,
    ok,
  });
  assert.deepEqual(result.failures, []);
});

/** A client that reads its replies, while others flood the server: checks every byte; resolves with the time it took. */
async function wellBehavedClient(): Promise<number> {
  const started = Date.now();
  const data = new Rng(seed, 'well-behaved').bytes(4 * 1024 * 1024);
  const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: nbdPort }, { exportName: 'fuzz', timeoutMs: 15_000 });
  try {
    await Promise.all([0, 1, 2, 3].map((k) => client.write(k * 1024 * 1024, data.subarray(k * 1024 * 1024, (k + 1) * 1024 * 1024))));
    await client.flush();
    assert.ok((await client.read(0, data.length)).equals(data), 'the well-behaved client read back other bytes than it wrote during the flood');
  } finally {
    await client.close();
  }
  assert.equal(digest(await readAll('keep')), keepDigest, 'the well-behaved client read other bytes from keep during the flood');
  return Date.now() - started;
}

// Each connection is bounded on its own (32 MiB in flight, 16 MiB of queued replies); the
// server-wide memory budget bounds their sum, so these 16 connections (~750 MiB unbounded) stop
// being read once they hold it, while a client on another connection keeps being served.
test('memory: 16 clients that pipeline 64 × 1 MiB reads and never read the replies stay within the server-wide budget', { timeout: 90_000 }, async () => {
  const rssBefore = server?.rssMiB() ?? 0;
  const rng = new Rng(seed, 'flood');
  const sessions: Session[] = [];
  let peak = rssBefore;
  const sampleRss = async (ms: number): Promise<void> => {
    for (let t = 0; t < ms / 100; t++) {
      await sleep(100);
      peak = Math.max(peak, server?.rssMiB() ?? 0);
    }
  };
  let servedMs: number;
  try {
    for (let k = 0; k < 16; k++) {
      const session = await attach(rng, Date.now() + 20_000);
      if (typeof session === 'string') assert.fail(session);
      sessions.push(session);
      const reads = Array.from({ length: 64 }, (_, j) =>
        encode({ magic: REQUEST_MAGIC, flags: 0, type: READ, handle: BigInt(j), offset: BigInt((j % 8) * 1024 * 1024), length: 1024 * 1024 }),
      );
      session.c.socket.pause();
      session.c.write(Buffer.concat(reads));
    }
    // The flood is held for 2 s, and the well-behaved client runs in the middle of it.
    const sampling = sampleRss(2_000);
    await sleep(500);
    servedMs = await wellBehavedClient();
    await sampling;
  } finally {
    for (const session of sessions) session.c.destroy();
  }
  // The flood's connections going away counts too.
  await sampleRss(1_000);
  const { rss } = await assertHealthy('the unread-reads flood', peak);
  // The budget counts live bytes; what connections gave back is freed only at the next GC, so RSS
  // may run past the budget: twice it is the bound (measured: about 1.2 times; without the budget, 6).
  const boundMiB = 2 * memoryBudgetMiB;
  const ok = peak - rssBefore < boundMiB;
  recordReliability(import.meta.url, {
    kind: 'bad-input',
    target: 'NBD',
    tried: '16 clients each pipelining 64 × 1 MiB reads and never reading the replies (held 2 s, then hanging up), while another client writes, reads back and checks 4 MiB and reads 8 MiB',
    observed: `RSS ${rssBefore.toFixed(0)}→${peak.toFixed(0)} MiB at the peak, the flood and its hang-up included (${rss.toFixed(0)} after the checks; server-wide budget ${memoryBudgetMiB} MiB, bound twice that): once the flood holds the budget its connections are no longer read; the other client's 4 writes, flush and reads all got correct bytes, in ${(servedMs / 1000).toFixed(1)} s, data intact`,
    ok,
  });
  assert.ok(ok, `RSS grew from ${rssBefore.toFixed(0)} to ${peak.toFixed(0)} MiB (bound ${boundMiB} MiB)`);
});

test('after all campaigns an independent client (nbdinfo) sees the exports as before', async () => {
  const { stdout } = await execFile('nbdinfo', ['--size', `nbd://127.0.0.1:${nbdPort}/keep`], { timeout: 30_000 });
  assert.equal(stdout.trim(), String(size));
  assert.ok(server?.alive);
});

/**
 * Post-copy with a recovered link cut, with no vmferry code in the migration
 * path: two QEMUs under TCG driven by plain QMP, the stream through a TCP relay
 * cut as soon as the guest runs on B (test/migration/live.test.ts's method),
 * then QEMU's recovery (migrate-pause on both ends, migrate-recover on B,
 * migrate resume=true on A). It tells a QEMU defect from a vmferry one when the
 * guest misbehaves on B afterwards. docs/QEMU-TCG-PRECOPY.md has the results.
 *
 *   node --import tsx bench/qemu-tcg-postcopy-recover.ts [--runs 3] [--cut yes|no] [--cont yes|no] [--bandwidth 8]
 *
 * --cont no keeps B's guest stopped (-S) throughout, so A's RAM (final once it
 * stopped for post-copy) and B's must match after the stream completes: both
 * are dumped with pmemsave and compared page by page before B is continued.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import Table from 'cli-table3';
import { testGuestSpec } from '../src/guest/test-guest.ts';
import type { DiskSpec } from '../src/qemu/spec.ts';
import { makeTempDir } from '../test/support/temp.ts';
import { TcpRelay } from '../test/support/tcp-relay.ts';
import { freePort, isMain, machineLine, mib, withCleanup } from './lib/common.ts';
import { userKnobs } from './lib/plain-command-line.ts';
import { spawnPlainQemu, type PlainQemu } from './lib/plain-qmp.ts';
import type { RawQmp } from './lib/raw-qmp.ts';

const memoryMiB = 256;
const pageBytes = 4096;

interface Outcome {
  seconds: number;
  passes: number;
  requests: number;
  cutWhile: string;
  differingPages: number | undefined;
  rebooted: boolean;
  oops: string;
}

interface MigrateInfo {
  status?: string;
  ram?: { 'dirty-sync-count'?: number; 'postcopy-requests'?: number };
  'socket-address'?: { port?: string }[];
}

const caps = (names: string[]): { capabilities: { capability: string; state: boolean }[] } => ({
  capabilities: names.map((capability) => ({ capability, state: true })),
});

const log = (text: string): void => console.error(`${new Date().toISOString()} ${text}`);

const query = (qmp: RawQmp): Promise<MigrateInfo> => qmp.execute<MigrateInfo>('query-migrate');

async function until(qmp: RawQmp, done: (info: MigrateInfo) => boolean, what: string, timeoutMs = 10 * 60_000): Promise<MigrateInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await query(qmp);
    if (done(info)) return info;
    if (info.status === 'failed' || Date.now() > deadline) throw new Error(`${what}: status ${info.status ?? '?'} ${JSON.stringify(info)}`);
    await sleep(20);
  }
}

/** migrate-pause where the stream is still believed up, then wait for postcopy-paused. */
async function pauseEnd(qmp: RawQmp, what: string): Promise<void> {
  // QEMU refuses it when its own thread saw the break first, between the query and the command.
  if ((await query(qmp)).status === 'postcopy-active') await qmp.execute('migrate-pause').catch(() => undefined);
  await until(qmp, (i) => i.status === 'postcopy-paused', `${what} pausing`);
}

async function comparePages(a: RawQmp, b: RawQmp, dir: string): Promise<number> {
  const dumpA = join(dir, 'memory-a');
  const dumpB = join(dir, 'memory-b');
  await a.execute('pmemsave', { val: 0, size: memoryMiB * mib, filename: dumpA });
  await b.execute('pmemsave', { val: 0, size: memoryMiB * mib, filename: dumpB });
  const memoryA = readFileSync(dumpA);
  const memoryB = readFileSync(dumpB);
  let differing = 0;
  for (let offset = 0; offset < memoryA.length; offset += pageBytes) {
    if (!memoryA.subarray(offset, offset + pageBytes).equals(memoryB.subarray(offset, offset + pageBytes))) differing++;
  }
  return differing;
}

async function migrateOnce(cut: boolean, cont: boolean, bandwidthMiBs: number, settleS: number, intervalMs: number | undefined, cache: 'writeback' | 'none', switchAt: number): Promise<Outcome> {
  return withCleanup(async (cleanup) => {
    const temp = await makeTempDir('tcg-postcopy');
    cleanup.add('remove temp dir', () => temp.remove());
    const image = join(temp.path, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, '64M']);
    // Shared: both ends open the same file, so only RAM and device state move.
    const disk: DiskSpec = { id: 'disk0', source: { kind: 'file', path: image, format: 'raw' } };
    // As live.test.ts's link-cut test: 32 MiB dirtied at 32 MiB/s, faster than the link.
    const guest = { mode: 'workload', spanMiB: 8, dirtyMiB: 32, dirtyRateMiBs: 32, ...(intervalMs === undefined ? {} : { intervalMs }) } as const;
    const specA = testGuestSpec('a', [disk], temp.path, guest, memoryMiB);
    const specB = testGuestSpec('b', [disk], temp.path, guest, memoryMiB);
    const knobs = { ...userKnobs, machine: 'q35', cache } as const;
    const a: PlainQemu = await spawnPlainQemu(specA, knobs, 'run', join(temp.path, 'runA'));
    cleanup.add('stop QEMU A', () => a.kill());
    // Out of band on B: a vCPU waiting for a page that cannot come (the link is down) may hold the main loop.
    const b: PlainQemu = await spawnPlainQemu(specB, knobs, 'incoming', join(temp.path, 'runB'), { oob: true });
    cleanup.add('stop QEMU B', () => b.kill());
    const relays: TcpRelay[] = [];
    cleanup.add('close the relays', () => Promise.all(relays.map((r) => r.close())));
    const reportA = specA.serialLogs?.[1] ?? '';
    for (let i = 0; i < 240 && !readFileSync(reportA, 'utf8').includes('ACK disk0 10'); i++) await sleep(500);

    await b.qmp.execute('migrate-set-capabilities', caps(['events', 'late-block-activate', 'return-path', 'postcopy-ram']));
    const port = await freePort();
    await b.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    relays.push(await TcpRelay.start('127.0.0.1', port));
    await a.qmp.execute('migrate-set-capabilities', caps(['events', 'return-path', 'postcopy-ram']));
    await a.qmp.execute('migrate-set-parameters', { 'max-bandwidth': bandwidthMiBs * mib, 'max-postcopy-bandwidth': bandwidthMiBs * mib });
    const started = performance.now();
    await a.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${relays[0]?.port}` });
    // --switch-at 2: after the first pass, as libvirt's --postcopy-after-precopy; 1: as soon as RAM moves.
    const switched = await until(a.qmp, (i) => (i.ram?.['dirty-sync-count'] ?? 0) >= switchAt, 'the first pass');
    await a.qmp.execute('migrate-start-postcopy');
    await b.qmp.waitEvent('MIGRATION', (d) => d.status === 'postcopy-active', 120_000);
    for (;;) {
      const { status } = await b.qmp.execute<{ status: string }>('query-status');
      if (status !== 'inmigrate') break;
      await sleep(20);
    }
    if (cont) await b.qmp.execute('cont');
    const cutWhile = (await query(a.qmp)).status ?? '?';
    if (cut) {
      relays[0]?.cut();
      await pauseEnd(a.qmp, 'A');
      // B in QEMU's order (postcopy-active, then postcopy-paused): its own events, as its main loop may not answer.
      await b.qmp.waitEvent('MIGRATION', (d) => d.status === 'postcopy-paused', 60_000);
      log('both paused');
      const recoverPort = await freePort();
      await b.qmp.executeOob('migrate-recover', { uri: `tcp:127.0.0.1:${recoverPort}` });
      const relay = await TcpRelay.start('127.0.0.1', recoverPort);
      relays.push(relay);
      await a.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${relay.port}`, resume: true });
      log(`resumed: A ${(await query(a.qmp)).status ?? '?'}`);
    }
    const done = await until(a.qmp, (i) => i.status === 'completed', 'post-copy', 180_000);
    const seconds = (performance.now() - started) / 1000;
    const differingPages = cont ? undefined : await comparePages(a.qmp, b.qmp, temp.path);
    if (!cont) await b.qmp.execute('cont');
    await sleep(settleS * 1000);
    const consoleB = readFileSync(specB.serialLogs?.[0] ?? '', 'utf8');
    const reportB = readFileSync(specB.serialLogs?.[1] ?? '', 'utf8');
    const oopsLine = consoleB.split('\n').find((l) => /Kernel panic|BUG:|Oops|general protection|segfault|invalid opcode/.test(l)) ?? '';
    return {
      seconds,
      passes: switched.ram?.['dirty-sync-count'] ?? 0,
      requests: done.ram?.['postcopy-requests'] ?? 0,
      cutWhile,
      differingPages,
      rebooted: /READY/.test(reportB),
      oops: oopsLine.trim().slice(0, 100),
    };
  });
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      cut: { type: 'string', default: 'yes' },
      cont: { type: 'string', default: 'yes' },
      bandwidth: { type: 'string', default: '8' },
      settle: { type: 'string', default: '20' },
      interval: { type: 'string' },
      cache: { type: 'string', default: 'writeback' },
      'switch-at': { type: 'string', default: '2' },
    },
  });
  const cut = values.cut === 'yes';
  const cont = values.cont === 'yes';
  console.log(`QEMU 7.2 post-copy under TCG, plain QMP, ${memoryMiB} MiB guest dirtying 32 MiB at 32 MiB/s, ${values.bandwidth} MiB/s; records every ${values.interval ?? 'default'} ms, cache=${values.cache}; post-copy from dirty-sync-count ${values['switch-at']}; link cut: ${values.cut}; B continued during post-copy: ${values.cont}. ${await machineLine()}`);
  const table = new Table({ head: ['time s', 'passes before post-copy', 'pages asked for', 'A when cut', 'pages differing', 'B rebooted', 'B console'] });
  for (let run = 0; run < Number(values.runs); run++) {
    const o = await migrateOnce(cut, cont, Number(values.bandwidth), Number(values.settle), values.interval === undefined ? undefined : Number(values.interval), values.cache === 'none' ? 'none' : 'writeback', Number(values['switch-at']));
    table.push([o.seconds.toFixed(1), o.passes, o.requests, cut ? o.cutWhile : '-', o.differingPages ?? '-', o.rebooted ? 'yes' : 'no', o.oops]);
    console.log(JSON.stringify(o));
  }
  console.log(table.toString());
}

if (isMain(import.meta.url)) await main();

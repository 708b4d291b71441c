/**
 * A throwaway single-node Ceph cluster, for tests and `vmferry demo --storage ceph`:
 * one monitor and one BlueStore OSD on a sparse file, both on one address
 * (127.0.0.1 unless told), in a temp dir, with one `rbd` pool of size 1
 * (scripts/setup.sh installs the packages). No manager: nothing vmferry uses
 * needs one (RBD, blocklists, watchers), and it idles at ~300 MiB.
 *
 * Brought up by hand-written steps rather than a deployment tool (keys in the
 * monitor's initial keyring, `ceph-mon --mkfs`, `ceph-osd --mkfs`): seconds.
 * The daemons run in the foreground as this process's children under
 * `setpriv --pdeathsig KILL`, so they die with this process even when it
 * is killed; `stop()` kills them and removes the dir.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CephClient } from '../storage/rbd.ts';
import { findFreePort } from '../util/ports.ts';
import { runProgram } from '../util/run.ts';

export interface TestCeph {
  /** How a client reaches it: the conf names the monitor and the admin keyring. */
  client: CephClient;
  /** The pool to create images in (size 1, application rbd). */
  pool: string;
  dir: string;
  /** Where its monitor listens, as a client reaches it. */
  monitor: { host: string; port: number };
  /** Kills the monitor and the OSD with `signal` (a storage outage under its clients); returns once they exited. */
  killDaemons(signal: 'SIGTERM' | 'SIGKILL'): Promise<void>;
  /** Starts killed daemons again on the same data and addresses; returns once the pool answers. */
  startDaemons(): Promise<void>;
  stop(): Promise<void>;
}

export interface CephOptions {
  /**
   * The address every daemon binds and clients reach them at (default
   * 127.0.0.1): a host in a network namespace reaches the root namespace at
   * its bridge's address, not at loopback.
   */
  address?: string;
  /** An empty directory to keep it in, made beforehand (an agent must trust it before the cluster starts); default: a new temp dir. */
  dir?: string;
}

function conf(dir: string, fsid: string, address: string, port: number): string {
  return `[global]
fsid = ${fsid}
mon host = v2:${address}:${port}
public addr = ${address}
run dir = ${dir}/run
log file = ${dir}/log/$name.log
keyring = ${dir}/client.keyring
mon data = ${dir}/mon-$id
osd data = ${dir}/osd-$id
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
# A nearly full test machine must not stop the cluster taking writes.
mon data avail crit = 0
mon osd full ratio = .99
mon osd nearfull ratio = .98
osd failsafe full ratio = .999
# A client whose watch is gone is noticed in 5 s, not 30.
osd client watch timeout = 5
[mon]
keyring = ${dir}/mon.keyring
[osd]
keyring = ${dir}/osd-$id/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 2147483648
# BlueStore polls its device every 250 ms by default, which makes the OSD's start slow.
bdev aio poll ms = 1
# The lowest target Ceph accepts.
osd memory target = 939524096
`;
}

/** Runs a Ceph tool, naming it in the error (and pointing at setup.sh when it is missing). */
function tool(program: string, args: string[]): Promise<string> {
  return runProgram(program, args, { timeoutMs: 60_000 });
}

export async function startCeph(options: CephOptions = {}): Promise<TestCeph> {
  const address = options.address ?? '127.0.0.1';
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), 'vmferry-ceph-')));
  const confPath = join(dir, 'ceph.conf');
  const daemons = new Map<string, ChildProcess>();
  const kill = (): void => {
    for (const daemon of daemons.values()) if (daemon.exitCode === null && daemon.signalCode === null) daemon.kill('SIGKILL');
  };
  // A run that ends without stop() (an uncaught error) must not leave a cluster behind.
  const onExit = (): void => {
    kill();
    rmSync(dir, { recursive: true, force: true });
  };
  process.on('exit', onExit);
  const exited = (daemon: ChildProcess): Promise<void> =>
    daemon.exitCode !== null || daemon.signalCode !== null ? Promise.resolve() : new Promise((resolve) => daemon.once('exit', () => resolve()));
  const start = (name: string, program: string, id: string): void => {
    const daemon = spawn('setpriv', ['--pdeathsig', 'KILL', '--', program, '-c', confPath, '-i', id, '-f'], { stdio: 'ignore' });
    daemon.on('error', () => undefined);
    daemons.set(name, daemon);
  };
  const killDaemons = async (signal: 'SIGTERM' | 'SIGKILL'): Promise<void> => {
    const all = [...daemons.values()];
    for (const daemon of all) daemon.kill(signal);
    await Promise.all(all.map(exited));
  };
  const startDaemons = async (): Promise<void> => {
    start('mon', 'ceph-mon', 'a');
    start('osd', 'ceph-osd', '0');
    // Reading the pool's directory needs the monitor and an active placement group on the OSD.
    await tool('rbd', ['-c', confPath, 'ls', 'rbd']);
  };
  const stop = async (): Promise<void> => {
    const all = [...daemons.values()];
    kill();
    await Promise.all(all.map(exited));
    process.off('exit', onExit);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const fsid = randomUUID();
    const port = await findFreePort(address);
    for (const sub of ['run', 'log', 'mon-a', 'osd-0']) await mkdir(join(dir, sub));
    await writeFile(confPath, conf(dir, fsid, address, port));
    const monKeyring = join(dir, 'mon.keyring');
    const clientKeyring = join(dir, 'client.keyring');
    const osdKeyring = join(dir, 'osd-0', 'keyring');
    await tool('ceph-authtool', ['--create-keyring', monKeyring, '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *']);
    await tool('ceph-authtool', ['--create-keyring', clientKeyring, '--gen-key', '-n', 'client.admin', '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *', '--cap', 'mgr', 'allow *']);
    await tool('ceph-authtool', ['--create-keyring', osdKeyring, '--gen-key', '-n', 'osd.0', '--cap', 'mon', 'allow profile osd', '--cap', 'osd', 'allow *', '--cap', 'mgr', 'allow profile osd']);
    // The monitor starts knowing every key, so nothing has to be registered with it afterwards.
    await tool('ceph-authtool', [monKeyring, '--import-keyring', clientKeyring]);
    await tool('ceph-authtool', [monKeyring, '--import-keyring', osdKeyring]);
    const monmap = join(dir, 'monmap');
    await tool('monmaptool', ['--create', '--addv', 'a', `[v2:${address}:${port}]`, '--fsid', fsid, monmap]);
    await tool('ceph-mon', ['-c', confPath, '--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', monKeyring]);
    start('mon', 'ceph-mon', 'a');
    const osdUuid = randomUUID();
    await tool('ceph', ['-c', confPath, '--connect-timeout', '30', 'osd', 'new', osdUuid, '0']);
    await tool('ceph-osd', ['-c', confPath, '-i', '0', '--mkfs', '--osd-uuid', osdUuid]);
    start('osd', 'ceph-osd', '0');
    await tool('ceph', ['-c', confPath, 'osd', 'pool', 'create', 'rbd', '8']);
    // Returns once the pool takes writes: the OSD is up and its placement groups active.
    await tool('rbd', ['-c', confPath, 'pool', 'init', 'rbd']);
    return {
      client: { conf: confPath, user: 'admin' },
      pool: 'rbd',
      dir,
      monitor: { host: address, port },
      killDaemons,
      startDaemons,
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

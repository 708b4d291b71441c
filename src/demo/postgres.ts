/**
 * A throwaway PostgreSQL cluster, for tests and `vmferry demo --ha`: Debian's postgresql-15 binaries
 * (scripts/setup.sh installs them), initdb in a temp dir owned by the
 * `postgres` system user (the server refuses to run as root), a free loopback
 * port and a socket in the same dir, fsync on as in production. `stop()` kills
 * it (`-m immediate`: a crash, nothing to wait for) and removes the dir.
 */
import { execFile as execFileCallback } from 'node:child_process';
import { chown, mkdtemp, rm } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';

const execFile = promisify(execFileCallback);
const bin = '/usr/lib/postgresql/15/bin';

export interface TestPostgres {
  /** The cluster's `postgres` database as the superuser `vmferry` (trust auth on loopback). */
  url: string;
  /** A URL whose session lives in a new, empty schema: a fresh database for one test, without CREATE DATABASE's checkpoint. */
  freshUrl(): Promise<string>;
  /** Runs one statement as the superuser. */
  query<Row extends pg.QueryResultRow>(sql: string, values?: unknown[]): Promise<Row[]>;
  /** Cuts every connection whose application_name is `name`, as a network partition or a server restart would; returns how many. */
  terminate(name: string): Promise<number>;
  /** Crashes the server (`-m immediate`: no checkpoint, every connection cut) and starts it again on the same port. */
  restart(): Promise<void>;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

async function asPostgres(command: string, args: string[]): Promise<void> {
  try {
    await execFile('runuser', ['-u', 'postgres', '--', join(bin, command), ...args], { timeout: 60_000 });
  } catch (err) {
    const failed = err as { stderr?: string; message: string };
    throw new Error(`${command} failed (is postgresql-15 installed? run scripts/setup.sh): ${failed.stderr || failed.message}`, { cause: err });
  }
}

export async function startPostgres(): Promise<TestPostgres> {
  const dir = await mkdtemp(join(tmpdir(), 'vmferry-pg-'));
  const data = join(dir, 'data');
  let started = false;
  const stop = async (): Promise<void> => {
    if (started) await asPostgres('pg_ctl', ['stop', '-D', data, '-m', 'immediate', '-w']).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const { uid, gid } = await postgresUser();
    await chown(dir, uid, gid);
    // --no-sync: initdb's own final sync only; the server below runs with fsync on.
    await asPostgres('initdb', ['-D', data, '-U', 'vmferry', '--auth=trust', '-E', 'UTF8', '--no-sync', '--no-instructions']);
    const port = await freePort();
    const settings = `-c listen_addresses=127.0.0.1 -p ${port} -k ${dir} -c fsync=on -c synchronous_commit=on -c max_connections=100 -c shared_buffers=16MB`;
    await asPostgres('pg_ctl', ['start', '-D', data, '-l', join(dir, 'server.log'), '-w', '-t', '60', '-o', settings]);
    started = true;
    const url = `postgres://vmferry@127.0.0.1:${port}/postgres`;
    const adminPool = (): pg.Pool => {
      const pool = new pg.Pool({ connectionString: url, max: 2, application_name: 'vmferry-test-admin' });
      pool.on('error', () => undefined);
      return pool;
    };
    let admin = adminPool();
    let schemas = 0;
    const query = async <Row extends pg.QueryResultRow>(sql: string, values: unknown[] = []): Promise<Row[]> => (await admin.query<Row>(sql, values)).rows;
    return {
      url,
      async freshUrl() {
        const schema = `t${++schemas}`;
        await query(`CREATE SCHEMA ${schema}`);
        return `${url}?options=${encodeURIComponent(`-c search_path=${schema}`)}`;
      },
      query,
      async terminate(name) {
        const rows = await query<{ pid: number }>('SELECT pg_terminate_backend(pid) AS pid FROM pg_stat_activity WHERE application_name = $1', [name]);
        return rows.length;
      },
      async restart() {
        await asPostgres('pg_ctl', ['stop', '-D', data, '-m', 'immediate', '-w']);
        await asPostgres('pg_ctl', ['start', '-D', data, '-l', join(dir, 'server.log'), '-w', '-t', '60', '-o', settings]);
        // Its connections died with the server: the next admin query must not be the one that finds out.
        await admin.end();
        admin = adminPool();
      },
      async stop() {
        await admin.end();
        await stop();
      },
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

async function postgresUser(): Promise<{ uid: number; gid: number }> {
  const { stdout } = await execFile('id', ['postgres']);
  const match = /uid=(\d+).*?gid=(\d+)/.exec(stdout);
  if (!match) throw new Error(`no postgres system user (install postgresql-15: scripts/setup.sh): ${stdout}`);
  return { uid: Number(match[1]), gid: Number(match[2]) };
}

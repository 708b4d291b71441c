/** A private storage server for a test: in-process, NBD and admin API on free loopback ports. */
import pino from 'pino';
import type { TlsIdentity } from '../../src/security/tls-files.ts';
import { StorageServer } from '../../src/storage/server.ts';
import { makeTempDir } from './temp.ts';

export interface TestStorage {
  server: StorageServer;
  dataDir: string;
  nbdPort: number;
  adminUrl: string;
  uri(volume: string): string;
  stop(): Promise<void>;
}

/** `tls`: the storage server's identity; it then takes TLS only, on NBD and its admin API. */
export async function startTestStorage(options: { tls?: TlsIdentity } = {}): Promise<TestStorage> {
  const dir = await makeTempDir('storage');
  const server = await StorageServer.start({
    dataDir: dir.path,
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    nbd: { host: '127.0.0.1', port: 0 },
    admin: { host: '127.0.0.1', port: 0 },
    ...(options.tls ? { tls: options.tls } : {}),
  });
  const nbdPort = server.addresses.nbdPort as number;
  return {
    server,
    dataDir: dir.path,
    nbdPort,
    adminUrl: server.addresses.adminUrl as string,
    uri: (volume) => `nbd://127.0.0.1:${nbdPort}/${volume}`,
    stop: async () => {
      await server.close();
      await dir.remove();
    },
  };
}

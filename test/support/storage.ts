/** A private storage server for a test: in-process, NBD and admin API on free loopback ports. */
import pino from 'pino';
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

export async function startTestStorage(): Promise<TestStorage> {
  const dir = await makeTempDir('storage');
  const server = await StorageServer.start({
    dataDir: dir.path,
    logger: pino({ level: process.env.VMFERRY_TEST_LOG ?? 'silent' }),
    nbd: { host: '127.0.0.1', port: 0 },
    admin: { host: '127.0.0.1', port: 0 },
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

/** Picks a free TCP port on an address, for servers (like QEMU's NBD server) that cannot report the port they bound. */
import { createServer } from 'node:net';

export function findFreePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen({ host, port: 0, exclusive: true }, () => {
      const address = server.address();
      server.close(() => {
        if (typeof address === 'object' && address !== null) resolve(address.port);
        else reject(new Error(`could not read the port bound on ${host}`));
      });
    });
  });
}

/**
 * vmferry's storage server alone in a process, serving a copy of a benchmark's file as volume `bench` until
 * SIGTERM (nbd-servers.ts, vmferryProcess).
 *
 *   node --import tsx bench/lib/storage-server-process.ts DIR FILE SIZE_MIB PORT
 */
import { vmferry } from './nbd-servers.ts';

const [dir, file, sizeMiB, port] = process.argv.slice(2);
if (!dir || !file || !Number.isInteger(Number(sizeMiB)) || !Number.isInteger(Number(port))) {
  throw new Error(`usage: storage-server-process.ts DIR FILE SIZE_MIB PORT (got ${process.argv.slice(2).join(' ')})`);
}
const server = await vmferry(dir, file, Number(sizeMiB), undefined, Number(port));
process.once('SIGTERM', () => {
  void server.stop().then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
});

/** qemu-nbd serving one image on a unix socket: a real NBD server for shared disks in tests. */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { existsSync } from 'node:fs';

export interface NbdExport {
  socket: string;
  exportName: string;
  stop(): Promise<void>;
}

export async function serveWithQemuNbd(image: string, format: 'raw' | 'qcow2', dir: string, exportName = 'shared'): Promise<NbdExport> {
  const socket = join(dir, `${exportName}.nbd.sock`);
  const child = spawn(
    'qemu-nbd',
    [`--format=${format}`, '--cache=none', '--discard=unmap', '--shared=8', '--persistent', `--export-name=${exportName}`, `--socket=${socket}`, image],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  for (let i = 0; i < 100 && !existsSync(socket); i++) await sleep(50);
  if (!existsSync(socket)) {
    child.kill('SIGKILL');
    throw new Error(`qemu-nbd did not create ${socket}`);
  }
  return {
    socket,
    exportName,
    stop: async () => {
      if (child.exitCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

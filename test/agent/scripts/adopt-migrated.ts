// Adopts a migrated VM into a VmRegistry over DATA_DIR, as the destination
// agent does when the guest resumed, then writes "adopted" to stdout: every
// syscall before that line happened before adoptMigrated resolved. ("adopting"
// marks the start, after the image was written.)
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import pino from 'pino';
import { RequestGuard } from '../../../src/agent/request-guard.ts';
import { VmRegistry } from '../../../src/agent/vm-registry.ts';
import type { QemuProcess } from '../../../src/qemu/process.ts';
import { validateVmSpec } from '../../../src/qemu/spec.ts';

const [dataDir, name] = process.argv.slice(2) as [string, string];
// Adopting checks nothing a request names: the guard trusts nothing.
const guard = await RequestGuard.create({ trustedDirs: [], poolDir: join(dataDir, 'pool'), vmsDir: join(dataDir, 'vms'), storageNbd: undefined });
const registry = new VmRegistry('B', dataDir, pino({ level: 'silent' }), { accelerator: 'tcg', reason: 'test' }, guard);
await registry.init();
// The mirror target the destination filled during the migration.
const image = join(dataDir, 'pool', `${name}-root.qcow2`);
await writeFile(image, 'guest data');
const spec = validateVmSpec({
  name,
  vcpus: 1,
  memoryMiB: 128,
  boot: { kind: 'kernel', kernel: '/boot/vmlinuz' },
  disks: [{ id: 'root', source: { kind: 'file', path: image, format: 'qcow2' } }],
});
process.stdout.write('adopting\n');
// adoptMigrated keeps the QEMU it is handed and reads only its spec; starting a real one adds nothing to what is traced here.
await registry.adoptMigrated({ spec } as QemuProcess);
process.stdout.write('adopted\n');

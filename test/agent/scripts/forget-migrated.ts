// Forgets a migrated-away VM in a VmRegistry over DATA_DIR, as the source agent
// does when it retires its half: "forgetting" and "forgotten" on stdout mark the
// start and the end, so a trace shows what happened in between, in order.
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import pino from 'pino';
import { writeOutgoingRecord } from '../../../src/agent/half-records.ts';
import { RequestGuard } from '../../../src/agent/request-guard.ts';
import { VmRegistry } from '../../../src/agent/vm-registry.ts';
import type { QemuProcess } from '../../../src/qemu/process.ts';
import { validateVmSpec } from '../../../src/qemu/spec.ts';

const [dataDir, name] = process.argv.slice(2) as [string, string];
const registry = new VmRegistry('A', dataDir, pino({ level: 'silent' }), { accelerator: 'tcg', reason: 'test' }, await RequestGuard.create({ trustedDirs: [], poolDir: join(dataDir, 'pool'), vmsDir: join(dataDir, 'vms'), storageNbd: undefined }));
await registry.init();
const spec = validateVmSpec({ name, vcpus: 1, memoryMiB: 128, boot: { kind: 'kernel', kernel: '/boot/vmlinuz' }, disks: [] });
// adoptMigrated writes the spec durably and keeps the QEMU it is handed: enough to have a VM directory here.
await registry.adoptMigrated({ spec } as QemuProcess);
const vmDir = registry.vmDir(name);
await writeOutgoingRecord(vmDir, { migration: 'm-1', wasRunning: true });
for (const file of ['serial0.log', 'serial1.log', 'notes.txt']) await writeFile(join(vmDir, file), 'x');
process.stdout.write('forgetting\n');
await registry.forgetMigrated(name);
process.stdout.write('forgotten\n');

/**
 * Each host's half of a migration, recorded durably beside the VM before the
 * step it names acts, so that an agent restarted after a crash or a power loss
 * knows what it was doing (docs/ARCHITECTURE.md, "The switch-over as a state
 * machine"):
 *
 *   DATA/vms/NAME/incoming.json   destination: whether a resume may have reached its QEMU
 *                                 (src/migration/no-return.ts), and the QEMU's spec
 *   DATA/vms/NAME/outgoing.json   source: the migration it belongs to, whether the guest
 *                                 ran before, so a rollback can resume it, and where
 *                                 the plan lets its disks and RAM go
 */
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { VmSpec } from '../qemu/spec.ts';
import { fsyncDir, writeFileDurable } from '../util/durable-file.ts';

export interface IncomingRecord {
  migration: string;
  /** prepared: never resumed here; resume-sent: a cont may have been sent; resumed: the guest ran here. */
  phase: 'prepared' | 'resume-sent' | 'resumed';
  /** The destination QEMU's spec (this host's paths and writer tokens), once it runs. */
  spec?: VmSpec;
}

export interface OutgoingRecord {
  migration: string;
  /** Whether the guest ran when the migration began: a rollback resumes it only then. */
  wasRunning: boolean;
  /** The plan's destination address, the only place the guest's disks and RAM may go (absent in records of earlier versions). */
  destination?: string;
}

const incomingFile = 'incoming.json';
const outgoingFile = 'outgoing.json';

export function writeIncomingRecord(vmDir: string, record: IncomingRecord): Promise<void> {
  return writeFileDurable(join(vmDir, incomingFile), JSON.stringify(record));
}

export async function readIncomingRecord(vmDir: string): Promise<IncomingRecord | undefined> {
  const record = await readRecord<IncomingRecord>(join(vmDir, incomingFile));
  return record && typeof record.migration === 'string' && ['prepared', 'resume-sent', 'resumed'].includes(record.phase) ? record : undefined;
}

export function writeOutgoingRecord(vmDir: string, record: OutgoingRecord): Promise<void> {
  return writeFileDurable(join(vmDir, outgoingFile), JSON.stringify(record));
}

export async function readOutgoingRecord(vmDir: string): Promise<OutgoingRecord | undefined> {
  const record = await readRecord<OutgoingRecord>(join(vmDir, outgoingFile));
  if (!record || typeof record.migration !== 'string' || typeof record.wasRunning !== 'boolean') return undefined;
  return typeof record.destination === 'string' ? record : { migration: record.migration, wasRunning: record.wasRunning };
}

export async function removeOutgoingRecord(vmDir: string): Promise<void> {
  await rm(join(vmDir, outgoingFile), { force: true });
  await fsyncDir(vmDir);
}

/** The parsed file, or undefined when there is none or it cannot be read (a torn write is no record). */
async function readRecord<T>(path: string): Promise<T | undefined> {
  const text = await readFile(path, 'utf8').catch(() => undefined);
  if (text === undefined) return undefined;
  try {
    return JSON.parse(text) as T;
  } catch {
    return undefined;
  }
}

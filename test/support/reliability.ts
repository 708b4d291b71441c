/**
 * The reliability tally: fault and bad-input tests record what they tried and
 * what happened, and scripts/reliability-doc.ts turns the records into
 * docs/RELIABILITY.md. Each test file writes its own JSON-lines file under
 * build/reliability/, started afresh by the first record of a run, so a rerun
 * of one file replaces only its own rows.
 */
import { appendFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const reliabilityDir = resolve(fileURLToPath(new URL('../../build/reliability', import.meta.url)));

export interface ReliabilityRecord {
  /** `fault` for injected failures, `bad-input` for malformed or hostile requests. */
  kind: 'fault' | 'bad-input';
  /** Where it was tried: `migration`, `storage`, `agent API`, `NBD`... */
  target: string;
  /** What was done, in a few words ("destination QEMU killed during the mirror"). */
  tried: string;
  /** What happened, as observed by the test ("VM runs on A, 812 acks intact, migration failed: ..."). */
  observed: string;
  /** Whether the outcome is what a user must be able to rely on. */
  ok: boolean;
}

const started = new Set<string>();

/** Records one row; `testFile` is the calling test's `import.meta.url`. */
export function recordReliability(testFile: string, record: ReliabilityRecord): void {
  const file = join(reliabilityDir, `${basename(fileURLToPath(testFile), '.test.ts')}.jsonl`);
  mkdirSync(reliabilityDir, { recursive: true });
  const line = `${JSON.stringify({ ...record, file: basename(fileURLToPath(testFile)), at: new Date().toISOString() })}\n`;
  if (started.has(file)) {
    appendFileSync(file, line);
  } else {
    started.add(file);
    writeFileSync(file, line);
  }
}

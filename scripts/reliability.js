#!/usr/bin/env node
// Runs the fault and bad-input tests, then writes docs/RELIABILITY.md from what
// they recorded, also when some failed (the page then says which did not hold).
import { spawnSync } from 'node:child_process';
import { resolve } from 'node:path';

const root = resolve(import.meta.dirname, '..');
const suites = ['test/faults', 'test/migration/live.test.ts', 'test/fuzz', 'test/storage/fencing.test.ts', 'test/storage/bad-input.test.ts', 'test/cluster/api.test.ts', 'test/migration/rbd.test.ts'];
const tests = spawnSync(process.execPath, ['scripts/run-tests.js', ...suites], { cwd: root, stdio: 'inherit' });
const doc = spawnSync(process.execPath, ['--import', 'tsx', 'scripts/reliability-doc.ts'], { cwd: root, stdio: 'inherit' });
process.exit(tests.status || doc.status || 0);

#!/usr/bin/env node
// Runs node's test runner on every *.test.ts under test/ (Node 20 does not glob).
// Files run one at a time: most of them boot QEMU under TCG, and two such files
// at once on a 2-core machine only make both slower and their timeouts flaky.
//
//   node scripts/run-tests.js                 all tests
//   node scripts/run-tests.js test/nbd        only files under a folder (or single files)
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '..');

function collect(path) {
  if (statSync(path).isFile()) return path.endsWith('.test.ts') ? [path] : [];
  return readdirSync(path)
    .sort()
    .flatMap((name) => collect(join(path, name)));
}

const targets = process.argv.slice(2);
const files = (targets.length ? targets : ['test'])
  .flatMap((target) => collect(resolve(root, target)))
  .map((file) => relative(root, file));
if (files.length === 0) {
  console.error(`no test files under ${targets.join(' ') || 'test'}`);
  process.exit(1);
}

const result = spawnSync(
  process.execPath,
  ['--import', 'tsx', '--test', '--test-concurrency=1', '--test-reporter=spec', ...files],
  { cwd: root, stdio: 'inherit' },
);
process.exit(result.status ?? 1);

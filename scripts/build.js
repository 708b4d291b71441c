#!/usr/bin/env node
// Compiles src/ into dist/ (tsconfig.build.json) and copies the files the code reads beside itself
// (the dashboard's page, the file-system helper's C source), so the CLI and the daemons run plain
// JavaScript. Does nothing, silently, when dist/ is already as new as the sources
// (scripts/dist-freshness.js); compiles only what changed otherwise (tsc's incremental build).
// Files in dist/ whose source is gone are removed, so dist/ (and the npm package) holds no stale module.
//
//   node scripts/build.js        (npm run build; scripts/setup.sh and scripts/run-tests.js run it)
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { distIsFresh, stampFile, startedFile } from './dist-freshness.js';

const root = resolve(import.meta.dirname, '..');
if (distIsFresh(root)) process.exit(0);

const src = join(root, 'src');
const dist = join(root, 'dist');
/** The compiler's own bookkeeping, kept in dist/ so deleting dist/ also forgets what tsc thinks it built. */
const keep = new Set([stampFile, startedFile, 'dist/.tsbuildinfo'].map((file) => join(root, file)));

function files(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => (entry.isDirectory() ? files(join(dir, entry.name)) : [join(dir, entry.name)]));
}

console.error('build: compiling src/ into dist/');
rmSync(join(root, stampFile), { force: true });
mkdirSync(dist, { recursive: true });
writeFileSync(join(root, startedFile), '');

// tsc's incremental build trusts its record of what it emitted: an output deleted since would not come back.
const sources = files(src).filter((file) => file.endsWith('.ts'));
if (sources.some((file) => !existsSync(join(dist, relative(src, file)).replace(/\.ts$/, '.js')))) rmSync(join(dist, '.tsbuildinfo'), { force: true });

const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
const compiled = spawnSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json')], { cwd: root, stdio: 'inherit' });
if (compiled.status !== 0) {
  console.error('build: tsc failed; dist/ is not used until a build succeeds (bin/vmferry.js runs the sources meanwhile)');
  process.exit(compiled.status ?? 1);
}

for (const file of files(src)) {
  if (file.endsWith('.ts')) continue;
  const target = join(dist, relative(src, file));
  if (existsSync(target) && statSync(target).mtimeMs >= statSync(file).mtimeMs) continue;
  mkdirSync(dirname(target), { recursive: true });
  copyFileSync(file, target);
}

for (const file of files(dist)) {
  if (keep.has(file)) continue;
  const source = join(src, relative(dist, file));
  const fromTypeScript = source.endsWith('.js') && existsSync(source.replace(/\.js$/, '.ts'));
  if (!fromTypeScript && !existsSync(source)) rmSync(file);
}

renameSync(join(root, startedFile), join(root, stampFile));

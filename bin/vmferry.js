#!/usr/bin/env node
// The CLI, compiled into dist/ (npm run build). In a checkout where dist/ is missing or older than
// src/ (a source edited since the last build), it runs the sources through tsx instead, so a command
// or a daemon started by a developer or a test never runs older code than the sources show. An
// installed package has no sources (and no tsx): it always runs dist/.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const checkout = existsSync(new URL('../src/cli/main.ts', import.meta.url));
if (checkout && !(await import('../scripts/dist-freshness.js')).distIsFresh(fileURLToPath(new URL('..', import.meta.url)))) {
  (await import('tsx/esm/api')).register();
  await import('../src/cli/main.ts');
} else {
  await import('../dist/cli/main.js');
}

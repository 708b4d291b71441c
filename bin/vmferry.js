#!/usr/bin/env node
// The CLI runs straight from the TypeScript sources through tsx, so `npx vmferry`
// works right after `npm ci` with no build step to forget.
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/main.ts');

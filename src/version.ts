/** vmferry's version: package.json states it, and everything that shows one (--version, /healthz, OpenAPI) reads it here. */
import { readFileSync } from 'node:fs';

export const vmferryVersion: string = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;

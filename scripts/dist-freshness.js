// Whether dist/ was built from the sources as they are now. The build (scripts/build.js) creates
// dist/.build-started before it compiles and renames it to dist/.built when it succeeded, so the
// stamp's time is the start of the last good build, by the file system's own clock: a source written
// since (also during that build) is newer than it. bin/vmferry.js asks this on every call from a
// checkout, so it only compares times (a few milliseconds for src/).
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** What the build reads: the sources (TypeScript and the files copied beside it) and the compiler's settings. */
const inputs = ['src', 'tsconfig.json', 'tsconfig.build.json'];
export const stampFile = 'dist/.built';
export const startedFile = 'dist/.build-started';

function newestMtimeMs(path) {
  const stats = statSync(path);
  if (!stats.isDirectory()) return stats.mtimeMs;
  // A directory's own time changes when a file in it is added, removed or renamed.
  return readdirSync(path).reduce((newest, name) => Math.max(newest, newestMtimeMs(join(path, name))), stats.mtimeMs);
}

/** True when dist/ holds a build that started after every input last changed. */
export function distIsFresh(root) {
  let built;
  try {
    built = statSync(join(root, stampFile)).mtimeMs;
  } catch {
    return false;
  }
  return inputs.every((input) => newestMtimeMs(join(root, input)) < built);
}

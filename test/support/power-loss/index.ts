/**
 * A host power loss for tests, on a machine without dm-flakey: the processes
 * of the host are killed with SIGKILL (the page cache survives that), then
 * whatever they wrote under their data directory and did not fsync is
 * dropped, following a journal of which writes were synced. The model of what
 * survives is at the top of drop.ts (the weakest POSIX guarantees).
 *
 * How a harness uses it, per host:
 *
 *   1. Start the host's node processes (vmferry's agent) with the environment
 *      from powerLossEnv({ journal, root }): root is the host's data directory
 *      (`agent --data-dir`), journal a file outside it, on the same file
 *      system (a sibling, so the shadow copies are hard links, not copies).
 *      It sets VMFERRY_POWERLOSS_JOURNAL, VMFERRY_POWERLOSS_ROOT and
 *      NODE_OPTIONS=--import=tsx --import=preload.ts (the preload is
 *      TypeScript; bin/vmferry.js registers tsx only after preloads ran, and
 *      registering it twice is harmless). One journal per root; several
 *      processes in a row (an agent restarted after a kill -9) share it.
 *   2. For the power loss: kill -9 every process of the host (the agent, its
 *      QEMUs) and wait until they are gone, then call dropUnsynced(journal,
 *      root) (synchronous). It rewrites root, returns what it changed and what
 *      it could not model, for the run's log, and empties the journal.
 *   3. Start the host again with the same environment.
 *
 * Only the preloaded processes' changes through node:fs/promises and
 * FileHandle are modelled; files written by other programs (QEMU's images,
 * qemu-img) count as durable as they are.
 */
export { dropUnsynced, type PowerLossChange, type PowerLossReport } from './drop.ts';

/** The environment that makes a node process journal its writes under `root` into `journal`. */
export function powerLossEnv(options: { journal: string; root: string }): Record<string, string> {
  const imports = `--import=${import.meta.resolve('tsx')} --import=${new URL('./preload.ts', import.meta.url).href}`;
  return {
    NODE_OPTIONS: [process.env.NODE_OPTIONS, imports].filter(Boolean).join(' '),
    VMFERRY_POWERLOSS_JOURNAL: options.journal,
    VMFERRY_POWERLOSS_ROOT: options.root,
  };
}

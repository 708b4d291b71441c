/** A path on the host that QEMU opens, as the schemas of VM specs and NBD addresses take it. */
import { Type } from '@sinclair/typebox';
import { hostFormat } from './schema-problem.ts';

/** Linux's PATH_MAX: a longer path is no file QEMU could open. */
const maxPathBytes = 4096;

/** What is wrong with `path` as a file QEMU opens, or undefined. */
export function hostPathProblem(path: string): string | undefined {
  if (Buffer.byteLength(path) > maxPathBytes) return `must be at most ${maxPathBytes} bytes`;
  if (!path.startsWith('/')) return `must be an absolute path (got "${path}")`;
  // A comma separates QEMU's options: a path with one would add options of its own.
  if (path.includes(',')) return `must not contain a comma (got "${path}")`;
  return undefined;
}

/** An absolute host path without a comma, at most PATH_MAX bytes (checked by validateVmSpec's schemaProblem, not by fastify). */
export const hostPathSchema = Type.String({ minLength: 1, format: hostFormat('host-path', hostPathProblem) });

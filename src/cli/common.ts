/** What every vmferry subcommand shares: addresses, sizes, logging, output. */
import { createRequire } from 'node:module';
import type pino from 'pino';
import type { Logger } from 'pino';
import { VmferryError } from '../errors.ts';

export const defaultControllerUrl = process.env.VMFERRY_CONTROLLER ?? 'http://127.0.0.1:10800';

export function parseListen(value: string, what: string): { host: string; port: number } {
  const match = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(value);
  const port = Number(match?.[2]);
  if (!match || port > 65535) throw new VmferryError('VMF_INVALID_ARGUMENT', `${what} must be HOST:PORT (got "${value}")`);
  return { host: match[1] as string, port };
}

/** Commander's accumulator for a repeatable option. */
export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

const units: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** "4G", "512M", "1048576" → bytes. */
export function parseSize(value: string, what: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(value.trim());
  const bytes = match ? Math.round(Number(match[1]) * (units[(match[2] ?? '').toUpperCase()] ?? 1)) : NaN;
  if (!Number.isFinite(bytes) || bytes <= 0) throw new VmferryError('VMF_INVALID_ARGUMENT', `${what} must be a size such as 4G or 512M (got "${value}")`);
  return bytes;
}

export function parsePositive(value: string, what: string): number {
  const number = Number(value);
  if (!Number.isFinite(number) || number <= 0) throw new VmferryError('VMF_INVALID_ARGUMENT', `${what} must be a positive number (got "${value}")`);
  return number;
}

const load = createRequire(import.meta.url);

/** Daemon logs: JSON lines on stderr, level from VMFERRY_LOG (default info). */
export function daemonLogger(name: string): Logger {
  // Required here, not imported: pino and its helpers are some thirty modules the CLI's other commands never use.
  const createLogger = load('pino') as typeof pino;
  return createLogger({ name, level: process.env.VMFERRY_LOG ?? 'info' }, createLogger.destination(2));
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/** Resolves on SIGINT/SIGTERM, so a daemon can shut down in order. */
export function untilSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const onSignal = (signal: NodeJS.Signals): void => {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      resolve(signal);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}

/**
 * A daemon's options from a YAML file (`/etc/vmferry/<daemon>.yaml`, or
 * `--config FILE`): each key is a long option without its dashes, as on the
 * command line (`host-id: A`, `trusted-dir: [/srv/images]`, `insecure: true`).
 * An option given on the command line wins over the file; the file wins over
 * defaults and VMFERRY_* variables. A key the daemon does not take is an error
 * naming it and the file, so a typo never passes for a setting.
 */
import type { Command, Option } from 'commander';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { VmferryError } from '../errors.ts';

export const defaultConfigDir = '/etc/vmferry';

/** The TLS options (tls-options.ts) every daemon's file may set. */
export const tlsGlobals = ['cert', 'key', 'ca', 'pki-dir'];

export interface ConfigFileSettings {
  /** The long options (without dashes) the daemon cannot start without, from the command line or the file. */
  required: string[];
  /** Options of the `vmferry` program itself (before the subcommand) the daemon uses, also taken from the file. */
  globals: string[];
}

/** Adds --config to a daemon's command, and reads the file before its action runs. */
export function withConfigFile(command: Command, daemon: string, settings: ConfigFileSettings): Command {
  return command
    .option('--config <file>', `a YAML file of these options, keys without the dashes, e.g. "listen: 10.0.0.2:10801" (default: ${defaultConfigDir}/${daemon}.yaml if it exists); options given here win over it`)
    .hook('preAction', async (thisCommand) => {
      await applyConfigFile(thisCommand, daemon, settings);
    });
}

function key(option: Option): string {
  return option.long?.replace(/^--/, '') ?? option.name();
}

/** The options a file may set: the command's own and the named globals, by key, with the command holding each. */
function settable(command: Command, globals: string[]): Map<string, { owner: Command; option: Option }> {
  const found = new Map<string, { owner: Command; option: Option }>();
  for (const option of command.options) if (!['config', 'help'].includes(key(option))) found.set(key(option), { owner: command, option });
  for (let parent = command.parent; parent; parent = parent.parent) {
    for (const option of parent.options) if (globals.includes(key(option)) && !found.has(key(option))) found.set(key(option), { owner: parent, option });
  }
  return found;
}

function scalar(value: unknown, name: string, path: string): string {
  if (typeof value === 'string' || (typeof value === 'number' && Number.isFinite(value))) return String(value);
  throw new VmferryError('VMF_INVALID_ARGUMENT', `key "${name}" in ${path} must be a single value (a string or a number), got ${JSON.stringify(value)}`);
}

/** The option's value as the command line would have produced it. */
function optionValue(option: Option, value: unknown, name: string, path: string): unknown {
  if (!option.required && !option.optional) {
    if (typeof value !== 'boolean') throw new VmferryError('VMF_INVALID_ARGUMENT', `key "${name}" in ${path} is a switch: true or false, got ${JSON.stringify(value)}`);
    return value ? true : undefined;
  }
  // A repeatable option (--trusted-dir DIR …) takes a list, or one value.
  if (Array.isArray(option.defaultValue) && option.parseArg) {
    const items = Array.isArray(value) ? value : [value];
    let result: unknown = [];
    for (const item of items) result = option.parseArg(scalar(item, name, path), result);
    return result;
  }
  const text = scalar(value, name, path);
  return option.parseArg ? option.parseArg(text, undefined) : text;
}

export async function applyConfigFile(command: Command, daemon: string, settings: ConfigFileSettings): Promise<void> {
  const given = command.getOptionValue('config') as string | undefined;
  const path = given ?? join(defaultConfigDir, `${daemon}.yaml`);
  let text: string | undefined;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    // The default file is optional; one named with --config is not.
    if (given !== undefined || (err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `cannot read the config file ${path}: ${(err as Error).message}`, { cause: err });
    }
  }
  if (text !== undefined) {
    // yaml is some seventy modules, loaded only when a file is there to read.
    const { parseDocument } = await import('yaml');
    const document = parseDocument(text, { uniqueKeys: true });
    const [error] = document.errors;
    if (error) throw new VmferryError('VMF_INVALID_ARGUMENT', `${path} is not valid YAML: ${error.message}`);
    const data: unknown = document.toJS();
    if (data !== null && data !== undefined && (typeof data !== 'object' || Array.isArray(data))) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `${path} must be a mapping of option names to values, such as "listen: 10.0.0.2:10801"`);
    }
    const options = settable(command, settings.globals);
    for (const [name, value] of Object.entries((data ?? {}) as Record<string, unknown>)) {
      const entry = options.get(name);
      if (!entry) throw new VmferryError('VMF_INVALID_ARGUMENT', `unknown key "${name}" in ${path}: vmferry ${daemon} takes ${[...options.keys()].sort().join(', ')}`);
      const attribute = entry.option.attributeName();
      if (entry.owner.getOptionValueSource(attribute) === 'cli') continue;
      entry.owner.setOptionValueWithSource(attribute, optionValue(entry.option, value, name, path), 'config');
    }
  }
  const values = command.optsWithGlobals<Record<string, unknown>>();
  for (const name of settings.required) {
    const option = command.options.find((o) => key(o) === name);
    if (option && values[option.attributeName()] === undefined) {
      throw new VmferryError('VMF_INVALID_ARGUMENT', `vmferry ${daemon} needs --${name}: give it on the command line, or as "${name}:" in ${path}`);
    }
  }
}

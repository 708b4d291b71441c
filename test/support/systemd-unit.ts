/** Reading contrib/systemd's units as systemd does, for the tests that check them. */
import assert from 'node:assert/strict';
import { join } from 'node:path';

export const contribSystemd = join(import.meta.dirname, '../../contrib/systemd');
/** Where the units expect the command: `npm install -g --prefix /opt/vmferry` (README, "Running as a service"). */
export const installedCli = '/opt/vmferry/bin/vmferry';

export const serviceUnits = [
  { unit: 'vmferry-storage.service', env: 'storage.env.example', command: ['storage', 'serve'] },
  { unit: 'vmferry-controller.service', env: 'controller.env.example', command: ['controller'] },
  { unit: 'vmferry-agent.service', env: 'agent.env.example', command: ['agent'] },
] as const;

/** A unit file's [Service] settings: key → every value it is given, in order. */
export function serviceSettings(text: string): Map<string, string[]> {
  const settings = new Map<string, string[]>();
  let section = '';
  for (const line of text.replace(/\\\n/g, ' ').split('\n').map((l) => l.trim())) {
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = header[1] as string;
      continue;
    }
    const eq = line.indexOf('=');
    if (section !== 'Service' || eq < 0) continue;
    const key = line.slice(0, eq);
    settings.set(key, [...(settings.get(key) ?? []), line.slice(eq + 1)]);
  }
  return settings;
}

/** An environment file's variables (plain KEY=value lines, as the examples are written). */
export function environmentFile(text: string): Record<string, string> {
  return Object.fromEntries(text.split('\n').filter((l) => /^[A-Z_]+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

/** The unit's one ExecStart, in words as systemd makes them: ${VAR} replaced inside a word, a lone $VAR split into words. */
export function execStartWords(unitText: string, env: Record<string, string>): string[] {
  const execStart = serviceSettings(unitText).get('ExecStart');
  assert.equal(execStart?.length, 1, 'one ExecStart');
  return (execStart?.[0] as string).split(/\s+/).flatMap((word) => {
    const lone = /^\$([A-Z_]+)$/.exec(word);
    if (lone) return (env[lone[1] as string] ?? '').split(/\s+/).filter(Boolean);
    return [
      word.replace(/\$\{([A-Z_]+)\}/g, (_match, name: string) => {
        assert.ok(name in env, `\${${name}} is set in the environment file`);
        return env[name] as string;
      }),
    ];
  });
}

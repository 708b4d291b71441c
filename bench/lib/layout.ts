/** How a scenario's disks are filled before boot: one block, or stripes (many extents, as a file system leaves them). */
import { join } from 'node:path';
import { execFile } from './common.ts';
import type { Scenario } from './run-types.ts';

/** qemu-io commands that write `fillMiB` into a disk as the scenario lays it out. */
export function fillCommands(scenario: Scenario, fillMiB: number): string[] {
  const commands: string[] = [];
  const stripes = scenario.stripes;
  if (stripes) {
    for (let done = 0, at = stripes.fromMiB; done < fillMiB; done += stripes.sizeMiB, at += stripes.everyMiB) {
      commands.push('-c', `write -P 0x6b ${at}M ${Math.min(stripes.sizeMiB, fillMiB - done)}M`);
    }
    return commands;
  }
  // Right after the record area, where the guest's bulk writes land too: they overwrite data, not grow it.
  // qemu-io writes at most 2 GiB per request: 1 GiB pieces.
  for (let done = 0; done < fillMiB; done += 1024) {
    commands.push('-c', `write -P 0x6b ${(scenario.guest.spanMiB ?? 64) + done}M ${Math.min(1024, fillMiB - done)}M`);
  }
  return commands;
}

export async function fillImage(path: string, format: 'qcow2' | 'raw', scenario: Scenario, fillMiB: number): Promise<void> {
  if (fillMiB <= 0) return;
  await execFile('qemu-io', ['-f', format, ...fillCommands(scenario, fillMiB), path], { timeout: 600_000 });
}

/** The file behind a vmferry storage server's volume (src/storage/volumes.ts keeps raw files under volumes/). */
export function volumeFile(dataDir: string, name: string): string {
  return join(dataDir, 'volumes', `${name}.raw`);
}

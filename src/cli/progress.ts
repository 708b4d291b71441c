/**
 * Follows a migration's events from the controller until it ends: progress
 * bars in a terminal (one per mirrored disk, one for RAM), plain lines otherwise.
 */
import cliProgress from 'cli-progress';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MigrationEvent, MigrationReport } from '../migration/phases.ts';
import { formatBytes } from '../util/format.ts';
import type { ControllerClient } from '../controller/client.ts';

const pollMs = 300;

interface Display {
  show(event: MigrationEvent): void;
  stop(): void;
}

function plainDisplay(write: (line: string) => void): Display {
  let lastRamLine = 0;
  return {
    show(event) {
      if (event.type === 'phase') write(`phase ${event.phase}`);
      else if (event.type === 'escalation') write(`escalation: ${event.detail}`);
      else if (event.type === 'ram' && Date.now() - lastRamLine > 2000) {
        lastRamLine = Date.now();
        write(`ram ${formatBytes(event.ram.transferredBytes)} sent, ${formatBytes(event.ram.remainingBytes)} left`);
      } else if (event.type === 'disks') {
        for (const d of event.disks.filter((d) => d.operation === 'mirror' && d.ready)) write(`disk ${d.id} in sync (${formatBytes(d.bytesDone)})`);
      }
    },
    stop() {},
  };
}

function barDisplay(): Display {
  const bars = new cliProgress.MultiBar(
    { format: ' {label} |{bar}| {percentage}% {done}/{total} {note}', hideCursor: true, clearOnComplete: false },
    cliProgress.Presets.shades_grey,
  );
  const byName = new Map<string, cliProgress.SingleBar>();
  let phase = 'pending';
  const update = (name: string, done: number, total: number, note: string): void => {
    let bar = byName.get(name);
    if (!bar) {
      bar = bars.create(Math.max(total, 1), 0, { label: name.padEnd(10), done: '', total: '', note: '' });
      byName.set(name, bar);
    }
    bar.setTotal(Math.max(total, 1));
    bar.update(Math.min(done, Math.max(total, 1)), { done: formatBytes(done), total: formatBytes(total), note });
  };
  return {
    show(event) {
      if (event.type === 'phase') {
        phase = event.phase;
        bars.log(`phase ${phase}\n`);
      } else if (event.type === 'escalation') bars.log(`escalation: ${event.detail}\n`);
      else if (event.type === 'disks') {
        for (const d of event.disks.filter((d) => d.operation === 'mirror')) update(`disk ${d.id}`, d.bytesDone, d.bytesTotal, d.ready ? 'in sync' : '');
      } else if (event.type === 'ram') {
        const total = event.ram.transferredBytes + event.ram.remainingBytes;
        update('RAM', event.ram.transferredBytes, total, `dirty ${formatBytes(event.ram.dirtyRateBytes)}/s pass ${event.ram.iteration}`);
      }
    },
    stop() {
      bars.stop();
    },
  };
}

export async function followMigration(
  client: ControllerClient,
  id: string,
  mode: 'bars' | 'plain' | 'silent',
): Promise<MigrationReport> {
  const display = mode === 'bars' ? barDisplay() : mode === 'plain' ? plainDisplay((line) => process.stdout.write(`${line}\n`)) : undefined;
  let after = 0;
  try {
    for (;;) {
      const batch = await client.events(id, after);
      for (const stored of batch.events) {
        display?.show(stored.event);
        after = stored.seq;
      }
      if (batch.report) return batch.report;
      if (batch.events.length === 0) await sleep(pollMs);
    }
  } finally {
    display?.stop();
  }
}

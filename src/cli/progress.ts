/**
 * Follows a migration's events from the controller until it ends: progress
 * bars in a terminal (one per mirrored disk, one for RAM), plain lines
 * otherwise, JSON lines for scripts.
 */
import type { SingleBar } from 'cli-progress';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MigrationEvent, MigrationReport } from '../migration/phases.ts';
import { formatBytes } from '../util/format.ts';
import type { ControllerClient } from '../controller/client.ts';
import { hasCode, VmferryError } from '../errors.ts';
import type { StoredEvent } from '../store/store.ts';
import { printJson } from './common.ts';

/** A lost stream is opened again this many times in a row, this far apart, before the command gives up. */
const reconnectTries = 10;
const reconnectGapMs = 1_000;

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

/** cli-progress is loaded only when bars are drawn: `vmferry --help` and scripts' --json runs start without it. */
async function barDisplay(): Promise<Display> {
  const { default: cliProgress } = await import('cli-progress');
  const bars = new cliProgress.MultiBar(
    { format: ' {label} |{bar}| {percentage}% {done}/{total} {note}', hideCursor: true, clearOnComplete: false },
    cliProgress.Presets.shades_grey,
  );
  const byName = new Map<string, SingleBar>();
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

/** One line of `--json` while a migration runs: a stored event of migration `id`. */
export interface ProgressLine extends StoredEvent {
  id: string;
}

/**
 * Follows a migration over the controller's live stream until its report:
 * bars or plain lines for people, one JSON line per event (`ndjson`) for
 * scripts, or nothing. A stream that ends early (the controller closed it, or
 * restarted) is opened again where it left off.
 */
export async function followMigration(client: ControllerClient, id: string, mode: 'bars' | 'plain' | 'silent' | 'ndjson'): Promise<MigrationReport> {
  const display = mode === 'bars' ? await barDisplay() : mode === 'plain' ? plainDisplay((line) => process.stdout.write(`${line}\n`)) : undefined;
  let after = 0;
  const stop = new AbortController();
  try {
    // Streams in a row that ended without a message: bounded, so a controller that keeps failing ends the command.
    for (let fruitless = 0; ; fruitless++) {
      try {
        for await (const message of client.migrationStream(id, after, stop.signal)) {
          fruitless = -1;
          if (message.event === 'report') return (JSON.parse(message.data) as { report: MigrationReport }).report;
          if (message.event !== 'progress') continue;
          const line = JSON.parse(message.data) as ProgressLine;
          display?.show(line.event);
          if (mode === 'ndjson') printJson(line);
          after = line.seq;
        }
      } catch (err) {
        // A controller that restarts is back within seconds; anything else (a wrong id, a refused certificate) is final.
        if ((!hasCode(err, 'VMF_UNREACHABLE') && !hasCode(err, 'VMF_TIMEOUT')) || fruitless >= reconnectTries) throw err;
      }
      if (fruitless >= reconnectTries) throw new VmferryError('VMF_UNREACHABLE', `the controller ended the stream of migration ${id} ${reconnectTries + 1} times without a word`);
      await sleep(reconnectGapMs);
    }
  } finally {
    stop.abort();
    display?.stop();
  }
}

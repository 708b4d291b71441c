/**
 * When each acknowledged record reached the host: the test guest's report
 * channel (a serial port logged to a file) is read every few milliseconds and
 * every new "ACK <disk> <k>" line gets the host's clock. Both ends' logs are
 * watched, so the gap around the switch-over is what the guest's writer lived
 * through, pause, drain and resume included, on one clock. The guest's own
 * clock would not do: under TCG it stands still while the VM is stopped.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { median } from './common.ts';

/** How often the logs are read: the figures below are this precise. */
export const ackWatchMs = 5;

interface Watched {
  path: string;
  handle: FileHandle | undefined;
  offset: number;
  partial: string;
}

export interface AckWatch {
  /** Watches another log from its current end (the destination's, once it exists). */
  add(path: string): void;
  /** Stops and returns every ack seen: disk, record number, host time (performance.now()). */
  stop(): Promise<AckTime[]>;
}

export interface AckTime {
  disk: string;
  k: number;
  t: number;
}

export function watchAcks(paths: string[]): AckWatch {
  const files: Watched[] = [];
  const acks: AckTime[] = [];
  const seen = new Set<string>();
  let stopped = false;
  const add = (path: string, fromStart: boolean): void => {
    const watched: Watched = { path, handle: undefined, offset: fromStart ? 0 : -1, partial: '' };
    files.push(watched);
  };
  const poll = async (file: Watched): Promise<void> => {
    file.handle ??= await open(file.path, 'r').catch(() => undefined);
    if (!file.handle) return;
    if (file.offset < 0) file.offset = (await file.handle.stat()).size;
    const buffer = Buffer.alloc(64 * 1024);
    for (;;) {
      const { bytesRead } = await file.handle.read(buffer, 0, buffer.length, file.offset);
      if (bytesRead === 0) return;
      file.offset += bytesRead;
      const now = performance.now();
      const lines = (file.partial + buffer.subarray(0, bytesRead).toString('latin1')).split('\n');
      file.partial = lines.pop() ?? '';
      for (const line of lines) {
        const words = line.replace(/\r$/, '').split(' ');
        if (words[0] !== 'ACK' || words.length !== 3) continue;
        // The source's and the destination's logs may be one file (libvirt): an ack counts once.
        const key = `${words[1]} ${words[2]}`;
        if (seen.has(key)) continue;
        seen.add(key);
        acks.push({ disk: words[1] as string, k: Number(words[2]), t: now });
      }
    }
  };
  for (const path of paths) add(path, false);
  const loop = (async () => {
    while (!stopped) {
      for (const file of files) await poll(file);
      await sleep(ackWatchMs);
    }
    for (const file of files) await poll(file);
    for (const file of files) await file.handle?.close();
  })();
  return {
    add: (path) => add(path, true),
    stop: async () => {
      stopped = true;
      await loop;
      return acks;
    },
  };
}

export interface AckGaps {
  /** The longest time between two consecutive acks of one disk, from `from` to `to` (worst disk), ms. */
  maxGapMs: number;
  /** The median time between consecutive acks per disk before `from` (the guest's normal pace), ms. */
  beforeMs: number;
  /** The same between `mirrorFrom` and `mirrorTo` (while the disks are mirrored), ms. */
  mirroringMs: number;
}

/** Gaps between acks per disk; windows in the watch's clock (performance.now()). */
export function ackGaps(acks: AckTime[], from: number, to: number, mirrorFrom: number, mirrorTo: number): AckGaps {
  const disks = [...new Set(acks.map((a) => a.disk))];
  let maxGapMs = 0;
  const before: number[] = [];
  const mirroring: number[] = [];
  for (const disk of disks) {
    const times = acks.filter((a) => a.disk === disk).sort((a, b) => a.k - b.k).map((a) => a.t);
    for (let i = 1; i < times.length; i++) {
      const [previous, current] = [times[i - 1] as number, times[i] as number];
      const gap = current - previous;
      // A gap that overlaps the window counts: the one spanning the switch-over starts before it ends.
      if (current >= from && previous <= to) maxGapMs = Math.max(maxGapMs, gap);
      if (current < from) before.push(gap);
      if (previous >= mirrorFrom && current <= mirrorTo) mirroring.push(gap);
    }
  }
  return { maxGapMs, beforeMs: median(before), mirroringMs: median(mirroring) };
}

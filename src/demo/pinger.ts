/**
 * Pings a guest from a network namespace every few ms (busybox ping) and
 * counts, from the replies themselves, how many went unanswered: what a
 * vMotion user measures across a migration.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';

export interface PingCount {
  /** Echo requests sent: up to the last one answered, or every one when the answers never came back. */
  sent: number;
  lost: number;
  /** The time the lost ones stand for: lost × the measured mean interval between requests. */
  lostMs: number;
  /** Runs of consecutive lost requests, with when the first of each was sent (ms since the epoch, from the mean interval). */
  lostRuns: { first: number; count: number; sentAt: number }[];
}

export class Pinger {
  readonly #child: ChildProcess;
  readonly #intervalMs: number;
  readonly #received = new Set<number>();
  readonly #exited: Promise<void>;
  #firstReply: { seq: number; at: number } | undefined;
  #lastReply: { seq: number; at: number } | undefined;
  #transmitted: number | undefined;

  private constructor(namespace: string, address: string, intervalMs: number) {
    this.#intervalMs = intervalMs;
    // -W: a reply that comes late (the guest was paused) counts as received, not lost.
    this.#child = spawn('ip', ['netns', 'exec', namespace, 'busybox', 'ping', '-i', String(intervalMs / 1000), '-W', '30', address], { stdio: ['ignore', 'pipe', 'ignore'] });
    this.#exited = new Promise((resolve) => this.#child.once('close', () => resolve()));
    createInterface({ input: this.#child.stdout as NodeJS.ReadableStream }).on('line', (line) => this.#onLine(line));
  }

  /** Starts pinging `address` from `namespace` every `intervalMs`. */
  static start(namespace: string, address: string, intervalMs = 10): Pinger {
    return new Pinger(namespace, address, intervalMs);
  }

  #onLine(line: string): void {
    const reply = /seq=(\d+) .*time=/.exec(line);
    if (reply && !line.includes('DUP')) {
      const seq = Number(reply[1]);
      this.#received.add(seq);
      const now = Date.now();
      this.#firstReply ??= { seq, at: now };
      if (seq > (this.#lastReply?.seq ?? -1)) this.#lastReply = { seq, at: now };
      return;
    }
    const summary = /(\d+) packets transmitted/.exec(line);
    if (summary) this.#transmitted = Number(summary[1]);
  }

  get replies(): number {
    return this.#received.size;
  }

  /**
   * Waits until `settleReplies` more replies came (the guest answers again,
   * so every request before them is settled), at most `timeoutMs`, then stops
   * and counts. Requests after the last reply count as lost only when the
   * guest never answered again.
   */
  async finish(settleReplies = 50, timeoutMs = 15_000): Promise<PingCount> {
    const target = this.#received.size + settleReplies;
    const deadline = Date.now() + timeoutMs;
    while (this.#received.size < target && Date.now() < deadline && this.#child.exitCode === null) await sleep(20);
    const settled = this.#received.size >= target;
    this.#child.kill('SIGINT');
    await this.#exited;
    const lastSeq = this.#lastReply?.seq ?? -1;
    const sent = settled ? lastSeq + 1 : Math.max(this.#transmitted ?? 0, lastSeq + 1);
    const lost = sent - this.#received.size;
    const first = this.#firstReply;
    const last = this.#lastReply;
    const meanIntervalMs = first && last && last.seq > first.seq ? (last.at - first.at) / (last.seq - first.seq) : this.#intervalMs;
    const lostRuns: PingCount['lostRuns'] = [];
    for (let seq = 0; seq < sent; seq++) {
      if (this.#received.has(seq)) continue;
      const run = lostRuns.at(-1);
      if (run && run.first + run.count === seq) run.count++;
      else lostRuns.push({ first: seq, count: 1, sentAt: Math.round((first?.at ?? 0) + (seq - (first?.seq ?? 0)) * meanIntervalMs) });
    }
    return { sent, lost, lostMs: Math.round(lost * meanIntervalMs), lostRuns };
  }

  /** Stops without counting (on an error path). */
  async stop(): Promise<void> {
    if (this.#child.exitCode === null && this.#child.signalCode === null) this.#child.kill('SIGKILL');
    await this.#exited;
  }
}

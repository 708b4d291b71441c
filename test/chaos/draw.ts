/**
 * What one chaos run does, drawn from the campaign's seed and the run's
 * number alone: the fault, the phase it lands in, the delay inside that
 * phase, and the fault's own parameters. The same (seed, run) always draws
 * the same run, whatever ran before it.
 */
import { Rng } from '../fuzz/prng.ts';
import type { ReplyFault } from './fault-proxy.ts';

export const faultKinds = [
  'kill-agent-a',
  'kill-agent-b',
  'kill-controller',
  'kill-qemu-a',
  'kill-qemu-b',
  'kill-storage',
  'lost-reply',
  'late-reply',
  'cancel',
  'cut-link',
  'power-loss-a',
  'power-loss-b',
] as const;
export type FaultKind = (typeof faultKinds)[number];

/** Phases a fault can be aimed at, in the order a migration goes through them. */
export const targetPhases = ['preparing', 'mirroring', 'migrating', 'paused-at-switchover', 'resume-sent', 'completed'] as const;

/** Replies worth losing, by the agent that gives them, and how long its caller waits (src/agent/client.ts). */
export const replyRoutes = [
  { host: 'B', route: '/destination/prepare', callerTimeoutMs: 120_000, phase: 'preparing' },
  { host: 'B', route: '/destination/resume', callerTimeoutMs: 60_000, phase: 'paused-at-switchover' },
  { host: 'B', route: '/destination/fate', callerTimeoutMs: 90_000, phase: 'paused-at-switchover' },
  { host: 'A', route: '/source/continue', callerTimeoutMs: 30_000, phase: 'paused-at-switchover' },
  { host: 'A', route: '/source/retire', callerTimeoutMs: 60_000, phase: 'resume-sent' },
  { host: 'A', route: '/source/begin', callerTimeoutMs: 30_000, phase: 'preparing' },
] as const;

export interface RunDraw {
  run: number;
  kind: FaultKind;
  /** The phase the fault waits for (for a reply fault: the phase of its route). */
  phase: string;
  /** Milliseconds after that phase was seen, before the fault. */
  delayMs: number;
  /** How long a killed daemon stays down, a link stays cut, or a powered-off host stays off. */
  outageMs: number;
  /** Reply faults only: the agent behind the proxy and what the proxy does. */
  reply?: { host: 'A' | 'B' } & ReplyFault;
}

/** Phases of an uncapped migration of the small chaos VM last about a second or less: longer delays would mostly land after the switch-over. */
export const maxDelayMs = 800;

export function drawRun(seed: number, run: number, kinds: readonly FaultKind[] = faultKinds): RunDraw {
  const rng = new Rng(seed, 'chaos', run);
  const kind = rng.pick(kinds);
  const phase = rng.pick(targetPhases);
  const delayMs = rng.int(0, maxDelayMs);
  const outageMs = kind === 'cut-link' ? rng.int(2_000, 8_000) : rng.int(0, 3_000);
  const draw: RunDraw = { run, kind, phase, delayMs, outageMs };
  if (kind === 'lost-reply' || kind === 'late-reply') {
    const route = rng.pick(replyRoutes);
    // Late: either just slow, or later than the caller waits (the caller gives up while the agent has acted).
    const lateMs = rng.chance(0.5) ? route.callerTimeoutMs + 2_000 : rng.int(1_000, 5_000);
    draw.phase = route.phase;
    draw.reply = { host: route.host, route: route.route, mode: kind === 'lost-reply' ? 'lost' : 'late', delayMs: kind === 'late-reply' ? lateMs : 0 };
  }
  return draw;
}

/** "kill-qemu-b" → "B": the host a per-host fault hits. */
export function faultHost(kind: FaultKind): 'A' | 'B' | undefined {
  if (kind.endsWith('-a')) return 'A';
  if (kind.endsWith('-b')) return 'B';
  return undefined;
}

/** `vmferry host drain` and `host undrain`: one progress view for every VM of the drain, then a table per VM. */
import type { SingleBar } from 'cli-progress';
import type { Command } from 'commander';
import { setTimeout as sleep } from 'node:timers/promises';
import { ControllerClient } from '../controller/client.ts';
import type { DrainedVm, DrainStatus } from '../controller/drain.ts';
import { maxDrainParallel } from '../api/drain-limits.ts';
import { VmferryError } from '../errors.ts';
import type { MigrationEvent } from '../migration/phases.ts';
import { formatBytes } from '../util/format.ts';
import { printJson } from './common.ts';
import { table } from './render.ts';
import { commandTls } from './tls-options.ts';

const pollMs = 500;
const MiB = 1024 * 1024;

interface GlobalOptions {
  controller: string;
  json?: boolean;
}

function parseParallel(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > maxDrainParallel) throw new VmferryError('VMF_INVALID_ARGUMENT', `--parallel must be an integer from 1 to ${maxDrainParallel} (got "${value}")`);
  return n;
}

function parseBandwidth(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new VmferryError('VMF_INVALID_ARGUMENT', `--bandwidth must be a positive number of MiB/s (got "${value}")`);
  return n;
}

function parseHosts(value: string): string[] {
  const hosts = value.split(',').map((h) => h.trim());
  if (hosts.some((h) => h === '')) throw new VmferryError('VMF_INVALID_ARGUMENT', `--to must be host names separated by commas (got "${value}")`);
  return hosts;
}

/** Bytes done and to do of one migration, from its latest disk and RAM events. */
interface Progress {
  after: number;
  disks: Map<string, { done: number; total: number }>;
  ram: { done: number; total: number } | undefined;
}

function apply(progress: Progress, event: MigrationEvent): void {
  if (event.type === 'disks') for (const d of event.disks.filter((d) => d.operation === 'mirror')) progress.disks.set(d.id, { done: d.bytesDone, total: d.bytesTotal });
  else if (event.type === 'ram') progress.ram = { done: event.ram.transferredBytes, total: event.ram.transferredBytes + event.ram.remainingBytes };
}

function totals(progress: Progress | undefined): { done: number; total: number } {
  const parts = [...(progress?.disks.values() ?? []), ...(progress?.ram ? [progress.ram] : [])];
  return { done: parts.reduce((s, p) => s + p.done, 0), total: parts.reduce((s, p) => s + p.total, 0) };
}

/** Follows the drain until it ends: a bar per VM in a terminal, a line per change otherwise. */
async function followDrain(api: ControllerClient, id: string, mode: 'bars' | 'plain' | 'silent'): Promise<DrainStatus> {
  const progress = new Map<string, Progress>();
  // Loaded by the drain's own command, so the CLI's other commands start without it.
  const { default: cliProgress } = await import('cli-progress');
  const bars = mode === 'bars' ? new cliProgress.MultiBar({ format: ' {label} |{bar}| {percentage}% {done}/{total} {note}', hideCursor: true, clearOnComplete: false }, cliProgress.Presets.shades_grey) : undefined;
  const barOf = new Map<string, SingleBar>();
  const said = new Map<string, string>();
  try {
    for (;;) {
      const status = await api.drain(id);
      for (const vm of status.vms) {
        if (vm.migrationId && vm.state === 'migrating') {
          const p = progress.get(vm.vm) ?? { after: 0, disks: new Map(), ram: undefined };
          progress.set(vm.vm, p);
          const batch = await api.events(vm.migrationId, p.after);
          for (const stored of batch.events) {
            apply(p, stored.event);
            p.after = stored.seq;
          }
        }
        const note = `${vm.state}${vm.to ? ` → ${vm.to}` : ''}${vm.phase && vm.state === 'migrating' ? ` (${vm.phase})` : ''}${vm.shareBytes ? `, cap ${formatBytes(vm.shareBytes)}/s` : ''}`;
        const { done, total } = totals(progress.get(vm.vm));
        if (bars) {
          let bar = barOf.get(vm.vm);
          if (!bar) {
            bar = bars.create(1, 0, { label: vm.vm.padEnd(12), done: '', total: '', note: '' });
            barOf.set(vm.vm, bar);
          }
          const whole = Math.max(total, 1);
          bar.setTotal(whole);
          bar.update(vm.state === 'completed' ? whole : Math.min(done, whole), { done: formatBytes(done), total: formatBytes(total), note });
        } else if (mode === 'plain' && said.get(vm.vm) !== note) {
          said.set(vm.vm, note);
          process.stdout.write(`${vm.vm}: ${note}\n`);
        }
      }
      if (status.state !== 'running') return status;
      await sleep(pollMs);
    }
  } finally {
    bars?.stop();
  }
}

function renderDrain(status: DrainStatus): string {
  const row = (v: DrainedVm): string[] => [
    v.vm,
    v.to ?? '',
    v.state,
    v.sentBytes === undefined ? '' : formatBytes(v.sentBytes),
    v.totalMs === undefined ? '' : `${(v.totalMs / 1000).toFixed(1)} s`,
    v.downtimeMs === undefined || v.downtimeMs === null ? '' : `${v.downtimeMs} ms`,
    v.reason ?? '',
  ];
  const lines = [`drain of ${status.host}: ${status.state}, ${(((status.endedAt ?? Date.now()) - status.startedAt) / 1000).toFixed(1)} s`, table(['vm', 'to', 'outcome', 'sent', 'time', 'downtime (QEMU)', 'why'], status.vms.map(row))];
  if (status.transfer && status.transfer.busyMs > 0) {
    const measured = `${(status.transfer.bytesPerSecond / MiB).toFixed(1)} MiB/s measured (${formatBytes(status.transfer.bytes)} over ${(status.transfer.busyMs / 1000).toFixed(1)} s of transfer)`;
    lines.push(status.bandwidthMiBs === null ? measured : `budget ${status.bandwidthMiBs} MiB/s: ${measured}`);
  }
  return lines.join('\n');
}

export function registerDrainCommands(host: Command): void {
  const api = (command: Command): { api: ControllerClient; json: boolean } => {
    const opts = command.optsWithGlobals<GlobalOptions>();
    return { api: new ControllerClient(opts.controller, commandTls(command, 'client')), json: opts.json ?? false };
  };
  host
    .command('drain <host>')
    .description('move every running VM off a host (marked draining: nothing new is placed there), within one bandwidth budget')
    .option('--to <hosts>', 'only these destinations, comma-separated (default: every reachable host not draining)', parseHosts)
    .option('--parallel <n>', 'migrations at once', parseParallel, 1)
    .option('--bandwidth <MiB/s>', 'the budget all its migrations share (disk mirrors and RAM), split evenly among those running', parseBandwidth)
    .action(async (hostId: string, opts: { to?: string[]; parallel: number; bandwidth?: number }, command: Command) => {
      const { api: client, json } = api(command);
      const started = await client.drainHost(hostId, { parallel: opts.parallel, ...(opts.to ? { to: opts.to } : {}), ...(opts.bandwidth === undefined ? {} : { bandwidthMiBs: opts.bandwidth }) });
      if (!json) console.log(`drain ${started.id} of ${hostId}: ${started.vms.length} VMs, ${opts.parallel} at once${opts.bandwidth === undefined ? '' : `, ${opts.bandwidth} MiB/s shared`}`);
      const status = await followDrain(client, started.id, json ? 'silent' : process.stdout.isTTY ? 'bars' : 'plain');
      if (json) printJson(status);
      else console.log(renderDrain(status));
      if (status.vms.some((v) => v.state !== 'completed')) process.exitCode = 1;
    });
  host
    .command('undrain <host>')
    .description('let a drained host take VMs again (a drain of it still running starts no more migrations)')
    .action(async (hostId: string, _opts, command: Command) => {
      const { api: client, json } = api(command);
      const result = await client.undrainHost(hostId);
      if (json) printJson(result);
      else console.log(`host ${hostId} takes VMs again`);
    });
}

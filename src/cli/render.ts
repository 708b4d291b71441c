/** Tables and lines for people: plans, reports, hosts, VMs. */
import Table from 'cli-table3';
import type { MigrationReport } from '../migration/phases.ts';
import { formatBytes, type MigrationPlan } from '../migration/plan.ts';

export function table(head: string[], rows: (string | number)[][]): string {
  const t = new Table({ head, style: { head: [], border: [] } });
  t.push(...rows.map((row) => row.map(String)));
  return t.toString();
}

export function renderPlan(plan: MigrationPlan): string {
  const rows = plan.disks.flatMap((d) => [
    [d.id, d.kind, d.operation, formatBytes(d.virtualSize), formatBytes(d.bytesToCopy), d.reason],
    // An overlay's base: a row of its own, so the table shows both halves of the one disk.
    ...(d.base ? [[`${d.id} (base)`, 'shared', 'reattach', formatBytes(d.base.virtualSize), formatBytes(0), `${d.base.export}, read-only: ${d.base.reachable ? `reachable from ${plan.to}: re-attached, nothing copied` : `NOT reachable from ${plan.to}`}`]] : []),
  ]);
  const ramHow = [
    `pre-copy, downtime limit ${plan.ram.downtimeLimitsMs.join(' → ')} ms`,
    ...(plan.ram.allowPostcopy ? ['post-copy allowed'] : []),
    ...(plan.ram.compareMemory ? ['both ends compared before B runs (TCG)'] : []),
  ].join(', ');
  rows.push(['(RAM)', 'memory', 'migrate', `${plan.ram.memoryMiB} MiB`, `≤ ${plan.ram.memoryMiB} MiB`, ramHow]);
  const lines = [`Plan: ${plan.vm} from ${plan.from} to ${plan.to}`, table(['disk', 'kind', 'operation', 'size', 'to copy', 'why'], rows)];
  if (plan.refusals.length) lines.push('Refused:', ...plan.refusals.map((r) => `  - ${r}`));
  return lines.join('\n');
}

export function renderReport(report: MigrationReport): string {
  const lines = [
    `Migration of ${report.vm} from ${report.from} to ${report.to}: ${report.outcome}` +
      (report.outcome === 'completed' ? ` in ${(report.totalMs / 1000).toFixed(1)} s, downtime ${report.downtimeMs ?? '?'} ms` : ''),
  ];
  if (report.error) lines.push(`  reason: ${report.error.message} [${report.error.code}]`);
  if (report.recovery && report.outcome === 'completed') lines.push(`  settled after a restart: ${report.recovery}`);
  if (report.ram.memoryCompared) lines.push('  guest memory identical at both ends before the destination ran (checked: TCG guest)');
  lines.push(
    table(
      ['disk', 'operation', 'size', 'bytes sent'],
      [
        ...report.disks.flatMap((d) => [[d.id, d.operation, formatBytes(d.virtualSize), formatBytes(d.bytesSent)], ...(d.base ? [[`${d.id} (base ${d.base})`, 'reattach', '-', formatBytes(0)]] : [])]),
        ['(RAM)', report.ram.passes > 0 ? `migrate (${report.ram.passes} passes)` : 'migrate', formatBytes(report.ram.totalBytes), formatBytes(report.ram.transferredBytes)],
      ],
    ),
    table(['phase', 'duration'], report.phases.filter((p) => p.durationMs > 0).map((p) => [p.phase, `${p.durationMs} ms`])),
  );
  return lines.join('\n');
}

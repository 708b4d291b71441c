/** Tables and lines for people: plans, reports, hosts, VMs. */
import Table from 'cli-table3';
import type { MigrationReport } from '../migration/phases.ts';
import type { MigrationPlan } from '../migration/plan.ts';
import type { Prediction } from '../migration/prediction.ts';
import { formatBytes } from '../util/format.ts';

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
    ...ramModeLines(plan),
    ...(plan.ram.allowPostcopy ? ['post-copy if it does not converge'] : []),
    ...(plan.ram.compareMemory ? [`both ends compared before B runs (TCG)${plan.ram.mode === 'postcopy' ? ', unless post-copy starts first' : ''}`] : []),
  ].join(', ');
  rows.push(['(RAM)', 'memory', 'migrate', `${plan.ram.memoryMiB} MiB`, `≤ ${plan.ram.memoryMiB} MiB`, ramHow]);
  const lines = [`Plan: ${plan.vm} from ${plan.from} to ${plan.to}`, table(['disk', 'kind', 'operation', 'size', 'to copy', 'why'], rows)];
  if (plan.prediction) lines.push(...predictionLines(plan.prediction, plan.ram.maxDowntimeMs));
  if (plan.refusals.length) lines.push('Refused:', ...plan.refusals.map((r) => `  - ${r}`));
  return lines.join('\n');
}

/** The prediction in one line, then how its figures were come by. */
function predictionLines(prediction: Prediction, maxDowntimeMs: number): string[] {
  const { totalMs, passes, pauseMs, converges } = prediction;
  const head =
    totalMs === undefined
      ? 'Predicted: not predicted'
      : `Predicted: ${seconds(totalMs)} of copying, ${passes === undefined ? 'passes until the timeout' : `${passes} passes`}, ` +
        (converges ? 'pre-copy converges' : 'pre-copy does NOT converge') +
        `, guest paused at most ${pauseMs ?? '?'} ms for RAM${pauseMs !== undefined && pauseMs > maxDowntimeMs ? ` (over --max-downtime ${maxDowntimeMs} ms unless the link is faster than the cap)` : ''}`;
  return [head, ...prediction.basis.map((b) => `  - ${b}`)];
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

/** How the plan moves RAM, and what it does when the RAM phase runs long. */
function ramModeLines(plan: MigrationPlan): string[] {
  const mode = plan.ram.mode;
  const how =
    mode === 'stop-and-copy'
      ? 'stop-and-copy: the guest stopped once the disks are in sync, RAM in one pass'
      : mode === 'postcopy'
        ? `${plan.ram.postcopyAtOnce ? 'post-copy as soon as RAM moves (TCG)' : 'pre-copy for one pass, then post-copy'}: the guest runs on ${plan.to} while the rest of RAM follows, and ${plan.from} never runs it again`
        : plan.ram.stopAfterFirstPass
          ? 'pre-copy for one pass while the guest runs, then the guest stopped while what it dirtied meanwhile moves (TCG; --no-tcg-stop-copy)'
          : `pre-copy, downtime limit ${plan.ram.downtimeLimitsMs.join(' → ')} ms`;
  const { timeoutS, timeoutAction, fallback } = plan.options;
  return [
    how,
    // Plans stored by an earlier version have no timeout action.
    ...(timeoutAction ? [`after ${timeoutS} s of RAM: ${timeoutAction}`] : []),
    ...(fallback === 'stop-and-copy' ? ['stop-and-copy after two memory mismatches'] : []),
  ];
}

export function renderReport(report: MigrationReport): string {
  const attempts = report.attemptLog ?? [];
  const lines = [
    `Migration of ${report.vm} from ${report.from} to ${report.to}: ${report.outcome}` +
      (report.outcome === 'completed' ? ` in ${(report.totalMs / 1000).toFixed(1)} s, guest paused ${msOrUnknown(report.pauseMs)} (QEMU's downtime ${msOrUnknown(report.downtimeMs)})` : '') +
      (attempts.length > 1 ? `, ${attempts.length} attempts` : ''),
  ];
  if (report.error) lines.push(`  reason: ${report.error.message} [${report.error.code}]`);
  const predicted = report.prediction;
  if (predicted?.totalMs !== undefined) {
    lines.push(
      `  predicted ${seconds(predicted.totalMs)} / actual ${seconds(report.totalMs)}; passes predicted ${predicted.passes ?? '(until the timeout)'} / actual ${report.ram.passes}; ` +
        `RAM pause predicted at most ${predicted.pauseMs ?? '?'} ms / QEMU's downtime ${msOrUnknown(report.downtimeMs)}`,
    );
  }
  if (report.recovery && report.outcome === 'completed') lines.push(`  settled after a restart: ${report.recovery}`);
  if (report.ram.memoryCompared) {
    const cost = report.ram.compareMs === undefined ? '' : `, ${report.ram.compareMs} ms of the pause`;
    lines.push(`  guest memory identical at both ends before the destination ran (checked: TCG guest${cost})`);
  }
  if (report.ram.postcopyWhy !== undefined) lines.push(`  ${postcopyLine(report)}`);
  for (const reset of report.ram.postcopyResets ?? []) {
    const when = reset.afterResumeMs === null ? '' : ` ${reset.afterResumeMs} ms after it resumed there`;
    lines.push(`  WARNING: the guest reset on ${report.to}${when} (QEMU: ${reset.reason}): it did not carry on, its memory there was not what it had on ${report.from}`);
  }
  if (attempts.length > 1) {
    attempts.forEach((a, i) => {
      const ended = a.error ? `${a.outcome} (${a.error.code})` : a.outcome;
      const mode = a.ramMode === 'live' || a.ramMode === undefined ? '' : ` (${a.ramMode})`;
      const passes = a.passes === undefined ? '' : ` in ${a.passes} passes`;
      lines.push(`  attempt ${i + 1}${mode}: ${ended} after ${(a.durationMs / 1000).toFixed(1)} s, RAM ${formatBytes(a.ramBytes)}${passes} and disks ${formatBytes(a.diskBytes)} sent, guest paused ${msOrUnknown(a.pauseMs)}`);
    });
    const all = report.allAttempts;
    if (all) lines.push(`  all attempts: RAM ${formatBytes(all.ramBytes)} and disks ${formatBytes(all.diskBytes)} sent, guest paused ${msOrUnknown(all.pauseMs)} in all`);
  }
  for (const step of report.escalations ?? []) lines.push(`  escalation at ${(step.atMs / 1000).toFixed(1)} s: ${step.action}: ${step.detail}`);
  const ramHow = [...(report.ramMode === 'stop-and-copy' ? ['guest stopped'] : []), `${report.ram.passes} passes`, ...(report.ram.throttlePercent ? [`guest throttled up to ${report.ram.throttlePercent} %`] : [])];
  lines.push(
    table(
      ['disk', 'operation', 'size', 'bytes sent'],
      [
        ...report.disks.flatMap((d) => [
          [d.id, d.operation, formatBytes(d.virtualSize), d.operation === 'reattach' ? `${formatBytes(0)} (no copy job)` : formatBytes(d.bytesSent)],
          ...(d.base ? [[`${d.id} (base ${d.base})`, 'reattach', '-', `${formatBytes(0)} (no copy job)`]] : []),
        ]),
        ['(RAM)', report.ram.passes > 0 ? `migrate (${ramHow.join(', ')})` : 'migrate', formatBytes(report.ram.totalBytes), formatBytes(report.ram.transferredBytes)],
      ],
    ),
  );
  for (const d of report.disks) {
    if (!d.storageIo) continue;
    lines.push(
      d.storageIo.measured
        ? `  ${d.id}: no copy job; the storage server saw ${formatBytes(d.storageIo.bytesRead)} read and ${formatBytes(d.storageIo.bytesWritten)} written for it during the migration`
        : `  ${d.id}: no copy job; what the storage server saw of it is not known: ${d.storageIo.why}`,
    );
  }
  lines.push(
    table(['phase', 'duration'], [
      ...report.phases.filter((p) => p.durationMs > 0).map((p) => [p.phase, `${p.durationMs} ms`]),
      ...(report.pauseMs === undefined ? [] : [[report.outcome === 'completed' ? "(guest paused: source's STOP → destination's RESUME)" : "(guest paused: source's STOP → its RESUME)", `${report.pauseMs} ms`]]),
    ]),
  );
  return lines.join('\n');
}

/** Post-copy in one line: why, how long the destination ran the guest while RAM arrived, and what that means for the memory comparison. */
function postcopyLine(report: MigrationReport): string {
  const { postcopyWhy, postcopyMs, postcopyRequests } = report.ram;
  const ran =
    postcopyMs === undefined
      ? 'its length was not measured'
      : `${report.to} ran the guest for ${postcopyMs} ms while the rest of RAM arrived${postcopyRequests === undefined ? '' : ` (${postcopyRequests} pages asked for on demand)`}`;
  return `post-copy: ${postcopyWhy}; ${ran}; memory not compared (still in flight when ${report.to} started)`;
}

/** A figure that was not measured says so, rather than showing a number. */
function msOrUnknown(ms: number | undefined): string {
  return ms === undefined ? '(not measured)' : `${ms} ms`;
}

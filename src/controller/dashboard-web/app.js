// The vmferry dashboard: hosts, VMs and migrations, with a live view of the
// migration selected. Lists are read once and again when a migration ends or
// an action is taken; a migration's progress arrives over GET /v1/live
// (server-sent events), never by polling. Served by the controller as is: no
// build step (Preact with htm, and uPlot, from the controller's node_modules).
import { html, render, useEffect, useRef, useState } from './vendor/preact-htm.js';
import uPlot from './vendor/uplot.js';

const finalPhases = ['completed', 'cancelled', 'failed'];
const phaseColors = {
  pending: '#98a2b3', preparing: '#7c8db5', mirroring: '#2f6fde', stopping: '#b7791f', migrating: '#6941c6',
  'paused-at-switchover': '#d97706', 'postcopy-started': '#c026d3', 'postcopy-active': '#a21caf', 'resume-sent': '#0e9384',
  resumed: '#16a34a', 'source-retired': '#15803d', completed: '#1f9254', 'rolling-back': '#e8590c', cancelled: '#c8372d',
  failed: '#c8372d', unresolved: '#9f1239',
};

/** A JSON call to the controller; its {code, message} becomes the error shown. */
async function api(method, path, body) {
  const response = await fetch(path, { method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const value = text ? JSON.parse(text) : undefined;
  if (!response.ok) throw new Error(value?.message ? `${value.message} [${value.code}]` : `${method} ${path}: HTTP ${response.status}`);
  return value;
}

function bytes(n) {
  if (n === undefined || n === null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

const ms = (n) => (n === undefined ? '(not measured)' : `${n} ms`);

/**
 * What the live view needs of one migration, folded from its events: the
 * latest disk and RAM progress, the phases with their start, and samples for
 * the plot (throughput from consecutive RAM events, QEMU's dirty rate).
 */
function emptyProgress() {
  return { lastSeq: 0, disks: [], ram: undefined, phases: [], samples: [], escalations: [] };
}

function fold(progress, stored) {
  if (stored.seq <= progress.lastSeq) return progress;
  const next = { ...progress, lastSeq: stored.seq };
  const event = stored.event;
  if (event.type === 'phase') next.phases = [...progress.phases, { phase: event.phase, at: event.at }];
  else if (event.type === 'disks') next.disks = event.disks;
  else if (event.type === 'escalation') next.escalations = [...progress.escalations, event];
  else if (event.type === 'ram') {
    const previous = progress.samples.at(-1);
    let throughput = null;
    // A new attempt starts counting again from 0: no rate across that gap.
    if (previous && stored.at > previous.at && event.ram.transferredBytes >= previous.ram) throughput = ((event.ram.transferredBytes - previous.ram) * 1000) / (stored.at - previous.at);
    next.ram = event.ram;
    next.samples = [...progress.samples, { at: stored.at, ram: event.ram.transferredBytes, throughput, dirty: event.ram.dirtyRateBytes }];
  }
  return next;
}

function Bar({ label, done, total, note, percent, testid }) {
  const p = percent ?? (total > 0 ? Math.min(100, Math.floor((done / total) * 100)) : 0);
  return html`<div class="bar" data-testid=${testid} data-percent=${p}>
    <span class="mono">${label}</span>
    <div class="track"><div class="fill" style=${{ width: `${p}%` }}></div></div>
    <span class="note">${p} % ${note ?? ''}</span>
  </div>`;
}

function Timeline({ phases, end }) {
  if (phases.length === 0) return html`<p class="muted">no phase yet</p>`;
  const start = phases[0].at;
  const stop = Math.max(end, phases.at(-1).at + 1);
  // A final phase lasts no time: it is where the migration ended.
  const spans = phases.map((p, i) => ({ ...p, ms: finalPhases.includes(p.phase) ? 0 : (phases[i + 1]?.at ?? stop) - p.at }));
  return html`<div class="timeline" data-testid="timeline">
      ${spans.map((s) => html`<div title="${s.phase}: ${s.ms} ms" style=${{ flexGrow: Math.max(s.ms, (stop - start) / 100), background: phaseColors[s.phase] ?? '#667085' }}>${s.phase}</div>`)}
    </div>
    <div class="legend">${spans.map((s) => html`<span style=${{ '--c': phaseColors[s.phase] ?? '#667085' }}>${s.phase}${finalPhases.includes(s.phase) ? '' : ` ${s.ms} ms`}</span>`)}</div>`;
}

/** RAM throughput and the guest's dirty rate over time (MiB/s), one uPlot chart redrawn as samples arrive. */
function RatePlot({ samples }) {
  const box = useRef(null);
  const chart = useRef(null);
  useEffect(() => {
    chart.current = new uPlot(
      {
        width: Math.max(320, box.current.clientWidth), height: 180,
        scales: { x: { time: false } },
        axes: [{ label: 's since the RAM phase began' }, { label: 'MiB/s' }],
        series: [{ label: 's' }, { label: 'RAM sent', stroke: '#2f6fde', width: 2 }, { label: 'guest dirtying', stroke: '#d97706', width: 2 }],
      },
      [[], [], []],
      box.current,
    );
    return () => chart.current.destroy();
  }, []);
  useEffect(() => {
    const t0 = samples[0]?.at ?? 0;
    const mib = (v) => (v === null ? null : v / 1048576);
    chart.current?.setData([samples.map((s) => (s.at - t0) / 1000), samples.map((s) => mib(s.throughput)), samples.map((s) => mib(s.dirty))]);
  }, [samples]);
  return html`<div ref=${box} data-testid="rate-plot"></div>`;
}

function Report({ record }) {
  const r = record.report;
  if (!r) return null;
  const ok = r.outcome === 'completed';
  return html`<div class="report ${ok ? '' : 'bad'}" data-testid="report" data-outcome=${r.outcome}>
    <strong>${r.vm} ${r.from} → ${r.to}: ${r.outcome}</strong>
    ${ok ? html` in ${(r.totalMs / 1000).toFixed(1)} s, guest paused ${ms(r.pauseMs)} (QEMU's downtime ${ms(r.downtimeMs)})` : ''}
    ${r.error ? html`<div class="refused">${r.error.message} [${r.error.code}]</div>` : ''}
    <table>
      <tr><th>disk</th><th>operation</th><th>size</th><th>bytes sent</th></tr>
      ${r.disks.map((d) => html`<tr><td class="mono">${d.id}</td><td>${d.operation}</td><td>${bytes(d.virtualSize)}</td><td>${d.operation === 'reattach' ? '0 B (no copy job)' : bytes(d.bytesSent)}</td></tr>`)}
      <tr><td class="mono">(RAM)</td><td>migrate (${r.ram.passes} passes)</td><td>${bytes(r.ram.totalBytes)}</td><td>${bytes(r.ram.transferredBytes)}</td></tr>
    </table>
    ${(r.attemptLog ?? []).length > 1 ? html`<div class="muted">${r.attemptLog.length} attempts: ${r.attemptLog.map((a) => a.error?.code ?? a.outcome).join(', ')}</div>` : ''}
  </div>`;
}

function LiveView({ record, progress, onCancel }) {
  if (!record) return html`<p class="muted">Start a migration, or pick one from the list.</p>`;
  const final = finalPhases.includes(record.phase);
  const completed = record.report?.outcome === 'completed';
  const mirrors = (progress.disks.length ? progress.disks : record.plan.disks.map((d) => ({ id: d.id, operation: d.operation, bytesDone: 0, bytesTotal: d.bytesToCopy, ready: d.operation === 'reattach' })))
    .filter((d) => d.operation === 'mirror');
  const ram = progress.ram;
  const end = record.report ? record.updatedAt : Date.now();
  return html`<div data-testid="live" data-migration=${record.id}>
    <div>
      <strong>${record.vm}</strong> ${record.from} → ${record.to}
      <span class="phase ${record.phase}" data-testid="phase">${record.phase}</span>
      <span class="muted mono"> ${record.id}</span>
      ${final || record.report ? '' : html` <button class="danger" onClick=${() => onCancel(record.id)}>Cancel</button>`}
    </div>
    <h3>Progress</h3>
    ${mirrors.map((d) => html`<${Bar} testid="disk-bar" label=${`disk ${d.id}`} done=${d.bytesDone} total=${d.bytesTotal}
        percent=${d.ready || completed ? 100 : undefined} note=${`${bytes(d.bytesDone)} / ${bytes(d.bytesTotal)}${d.ready ? ', in sync' : ''}`} />`)}
    ${record.plan.disks.filter((d) => d.operation === 'reattach').map((d) => html`<div class="bar"><span class="mono">disk ${d.id}</span><span class="muted">shared: re-attached, nothing copied</span><span></span></div>`)}
    <${Bar} testid="ram-bar" label="RAM" done=${ram?.transferredBytes ?? 0} total=${ram ? ram.transferredBytes + ram.remainingBytes : record.plan.ram.memoryMiB * 1048576}
      percent=${completed ? 100 : undefined}
      note=${completed ? `${bytes(record.report.ram.transferredBytes)} sent in ${record.report.ram.passes} passes` : ram ? `${bytes(ram.transferredBytes)} sent, ${bytes(ram.remainingBytes)} left, pass ${ram.iteration}` : 'not started'} />
    <h3>Phases</h3>
    <${Timeline} phases=${progress.phases} end=${end} />
    <h3>Throughput and dirty rate</h3>
    <${RatePlot} samples=${progress.samples} />
    ${progress.escalations.map((e) => html`<div class="muted">escalation ${e.action}: ${e.detail}</div>`)}
    <${Report} record=${record} />
  </div>`;
}

function PlanView({ plan }) {
  if (!plan) return null;
  return html`<div class="plan" data-testid="plan">
    <strong>Plan: ${plan.vm} from ${plan.from} to ${plan.to}</strong> <span class="muted">(dry run, nothing moved)</span>
    <table>
      <tr><th>disk</th><th>kind</th><th>operation</th><th>size</th><th>to copy</th><th>why</th></tr>
      ${plan.disks.map((d) => html`<tr><td class="mono">${d.id}</td><td>${d.kind}</td><td>${d.operation}</td><td>${bytes(d.virtualSize)}</td><td>${bytes(d.bytesToCopy)}</td><td class="muted">${d.reason}</td></tr>`)}
      <tr><td class="mono">(RAM)</td><td>memory</td><td>migrate (${plan.ram.mode})</td><td>${plan.ram.memoryMiB} MiB</td><td>≤ ${plan.ram.memoryMiB} MiB</td><td></td></tr>
    </table>
    ${plan.refusals.length ? html`<div class="refused">Refused: ${plan.refusals.join('; ')}</div>` : html`<div class="muted">No refusal: it can go.</div>`}
  </div>`;
}

/** Drain and undrain on each host: a drain's migrations then show in the list like any other, and its progress below. */
function HostActions({ host, busy, onDrain, onUndrain }) {
  const [parallel, setParallel] = useState('2');
  const [bandwidth, setBandwidth] = useState('');
  if (host.draining) return html`<button disabled=${busy} onClick=${() => onUndrain(host.id)}>Undrain</button>`;
  return html`<span class="drain-form">
    <label>parallel <select aria-label="parallel migrations of a drain of ${host.id}" value=${parallel} onChange=${(e) => setParallel(e.target.value)}>
      ${[1, 2, 3, 4].map((n) => html`<option value=${n}>${n}</option>`)}
    </select></label>
    <label>MiB/s <input aria-label="bandwidth budget of a drain of ${host.id}" size="4" inputmode="numeric" placeholder="any" value=${bandwidth} onInput=${(e) => setBandwidth(e.target.value)} /></label>
    <button class="primary" disabled=${busy || host.state !== 'reachable'} onClick=${() => onDrain(host.id, Number(parallel), bandwidth.trim())}>Drain</button>
  </span>`;
}

function Hosts({ hosts, infos, busy, onDrain, onUndrain }) {
  return html`<section>
    <h2>Hosts</h2>
    <table data-testid="hosts">
      <tr><th>host</th><th>state</th><th>accelerator</th><th>free memory</th><th>pool free</th><th>VMs</th><th></th></tr>
      ${hosts.map((h) => {
        const info = infos[h.id];
        return html`<tr data-host=${h.id}>
          <td class="mono">${h.id}</td><td>${h.state}${h.draining ? ', draining' : ''}</td>
          <td title=${h.acceleratorReason ?? ''}>${h.accelerator ?? 'unknown'}</td>
          <td>${info ? `${info.freeMemoryMiB} MiB` : '–'}</td><td>${info ? bytes(info.poolFreeBytes) : '–'}</td><td>${info?.vms ?? '–'}</td>
          <td><${HostActions} host=${h} busy=${busy} onDrain=${onDrain} onUndrain=${onUndrain} /></td>
        </tr>`;
      })}
    </table>
  </section>`;
}

/** How far a drained VM's migration is, from its live progress: disks and RAM together, by bytes. */
function drainPercent(entry, record, progress) {
  if (entry.state === 'completed' || record?.report?.outcome === 'completed') return 100;
  if (!progress) return 0;
  const disks = progress.disks.filter((d) => d.operation === 'mirror');
  const done = disks.reduce((sum, d) => sum + d.bytesDone, 0) + (progress.ram?.transferredBytes ?? 0);
  const total = disks.reduce((sum, d) => sum + d.bytesTotal, 0) + (progress.ram ? progress.ram.transferredBytes + progress.ram.remainingBytes : (record?.plan.ram.memoryMiB ?? 0) * 1048576);
  return total > 0 ? Math.min(99, Math.floor((done / total) * 100)) : 0;
}

function Drains({ drains, migrations, progress, onSelect }) {
  const list = [...drains.values()].sort((a, b) => b.startedAt - a.startedAt);
  if (list.length === 0) return null;
  return html`<section class="wide">
    <h2>Drains</h2>
    ${list.map((d) => html`<div class="drain" data-testid="drain" data-drain=${d.id} data-state=${d.state}>
      <strong>drain of ${d.host}</strong> <span class="muted">${d.state}, ${d.parallel} at once, ${d.bandwidthMiBs === null ? 'no bandwidth budget' : `${d.bandwidthMiBs} MiB/s shared`}
        ${d.transfer ? `, ${bytes(d.transfer.bytes)} moved at ${bytes(d.transfer.bytesPerSecond)}/s` : ''}</span>
      <table>
        <tr><th>VM</th><th>to</th><th>state</th><th>progress</th><th>pause</th></tr>
        ${d.vms.map((v) => {
          const record = v.migrationId ? migrations.get(v.migrationId) : undefined;
          const phase = record?.phase ?? v.phase;
          return html`<tr data-vm=${v.vm} class=${v.migrationId ? 'clickable' : ''} onClick=${() => v.migrationId && onSelect(v.migrationId)}>
            <td class="mono">${v.vm}</td><td>${v.to ?? ''}</td>
            <td data-testid="drain-state">${v.state}${v.state === 'migrating' && phase ? ` (${phase})` : ''}${v.reason ? html`<div class="refused">${v.reason}</div>` : ''}</td>
            <td><${Bar} testid="drain-bar" label=${v.vm} percent=${drainPercent(v, record, v.migrationId ? progress.get(v.migrationId) : undefined)} note=${v.shareBytes ? `capped at ${bytes(v.shareBytes)}/s` : ''} /></td>
            <td>${v.downtimeMs === undefined || v.downtimeMs === null ? '' : `${v.downtimeMs} ms`}</td>
          </tr>`;
        })}
      </table>
    </div>`)}
  </section>`;
}

function Vms({ vms, hosts, onPlan, onMigrate, busy, plan }) {
  const [targets, setTargets] = useState({});
  return html`<section>
    <h2>VMs</h2>
    <table data-testid="vms">
      <tr><th>VM</th><th>host</th><th>state</th><th>memory</th><th>disks</th><th>move to</th></tr>
      ${vms.map((v) => {
        const others = hosts.filter((h) => h.id !== v.host && h.state === 'reachable');
        // A choice made before the VM moved may name its own host now.
        const to = others.some((h) => h.id === targets[v.name]) ? targets[v.name] : others[0]?.id;
        return html`<tr data-vm=${v.name}>
          <td class="mono">${v.name}</td><td>${v.host}</td><td>${v.migration ? `${v.state} (${v.migration.phase})` : v.state}</td>
          <td>${v.spec.memoryMiB} MiB</td>
          <td class="muted">${v.spec.disks.map((d) => `${d.id}:${d.source.kind === 'nbd' ? 'shared' : 'local'}`).join(' ')}</td>
          <td>
            <select aria-label="destination of ${v.name}" value=${to} onChange=${(e) => setTargets({ ...targets, [v.name]: e.target.value })}>
              ${others.map((h) => html`<option value=${h.id}>${h.id}</option>`)}
            </select>
            <button disabled=${!to || busy} onClick=${() => onPlan(v.name, to)}>Plan</button>
            <button class="primary" disabled=${!to || busy || v.state !== 'running' || v.migrating} onClick=${() => onMigrate(v.name, to)}>Migrate</button>
          </td>
        </tr>`;
      })}
    </table>
    <${PlanView} plan=${plan} />
  </section>`;
}

function Migrations({ migrations, selected, onSelect }) {
  const rows = [...migrations.values()].sort((a, b) => b.createdAt - a.createdAt);
  return html`<section class="wide">
    <h2>Migrations</h2>
    <table data-testid="migrations">
      <tr><th>started</th><th>VM</th><th>from → to</th><th>phase</th><th>pause</th><th>id</th></tr>
      ${rows.map((m) => html`<tr class="clickable ${m.id === selected ? 'selected' : ''}" onClick=${() => onSelect(m.id)}>
        <td>${new Date(m.createdAt).toLocaleTimeString()}</td><td class="mono">${m.vm}</td><td>${m.from} → ${m.to}</td>
        <td><span class="phase ${m.phase}">${m.phase}</span></td><td>${m.report?.pauseMs === undefined ? '' : `${m.report.pauseMs} ms`}</td>
        <td class="mono muted">${m.id.slice(0, 8)}</td>
      </tr>`)}
    </table>
  </section>`;
}

function App() {
  const [hosts, setHosts] = useState([]);
  const [infos, setInfos] = useState({});
  const [vms, setVms] = useState([]);
  const [migrations, setMigrations] = useState(new Map());
  const [progress, setProgress] = useState(new Map());
  const [selected, setSelected] = useState(undefined);
  const [plan, setPlan] = useState(undefined);
  const [error, setError] = useState(undefined);
  const [busy, setBusy] = useState(false);
  const [live, setLive] = useState(false);
  const [drains, setDrains] = useState(new Map());
  const [, tick] = useState(0);

  const refresh = async () => {
    try {
      const [h, v] = await Promise.all([api('GET', '/v1/hosts'), api('GET', '/v1/vms')]);
      setHosts(h);
      setVms(v);
      const entries = await Promise.all(h.filter((x) => x.state === 'reachable').map((x) => api('GET', `/v1/hosts/${encodeURIComponent(x.id)}/info`).then((info) => [x.id, info], () => [x.id, undefined])));
      setInfos(Object.fromEntries(entries));
    } catch (err) {
      setError(err.message);
    }
  };

  useEffect(() => {
    void refresh();
    const events = new EventSource('/v1/live');
    events.onopen = () => setLive(true);
    events.onerror = () => setLive(false);
    events.addEventListener('migration', (message) => {
      const record = JSON.parse(message.data);
      setMigrations((previous) => {
        const before = previous.get(record.id);
        // A migration that just ended moved (or kept) a VM: the lists change.
        if (before && !before.report && record.report) void refresh();
        return new Map(previous).set(record.id, record);
      });
    });
    events.addEventListener('drain', (message) => {
      const drain = JSON.parse(message.data);
      setDrains((previous) => {
        // A drain that ended changed which hosts are draining and where the VMs are.
        if (previous.get(drain.id)?.state === 'running' && drain.state !== 'running') void refresh();
        return new Map(previous).set(drain.id, drain);
      });
    });
    events.addEventListener('progress', (message) => {
      const stored = JSON.parse(message.data);
      setProgress((previous) => new Map(previous).set(stored.id, fold(previous.get(stored.id) ?? emptyProgress(), stored)));
    });
    // The timeline's last phase grows while it lasts.
    const clock = setInterval(() => tick((n) => n + 1), 1000);
    return () => {
      events.close();
      clearInterval(clock);
    };
  }, []);

  const select = async (id) => {
    setSelected(id);
    const record = migrations.get(id);
    // A migration that ended before this page opened: its events once, from the store.
    if (record && finalPhases.includes(record.phase) && !progress.has(id)) {
      const batch = await api('GET', `/v1/migrations/${id}/events?after=0`);
      setProgress((previous) => new Map(previous).set(id, batch.events.reduce((p, stored) => fold(p, { id, ...stored }), emptyProgress())));
    }
  };

  const act = async (what) => {
    setBusy(true);
    setError(undefined);
    try {
      await what();
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  const onPlan = (vm, to) => act(async () => setPlan((await api('POST', '/v1/migrations', { vm, to, dryRun: true })).plan));
  const onMigrate = (vm, to) =>
    act(async () => {
      const started = await api('POST', '/v1/migrations', { vm, to });
      setPlan(undefined);
      setSelected(started.id);
      await refresh();
    });
  const onCancel = (id) => act(() => api('POST', `/v1/migrations/${id}/cancel`, {}));
  const onDrain = (host, parallel, bandwidth) =>
    act(async () => {
      const budget = bandwidth === '' ? undefined : Number(bandwidth);
      if (budget !== undefined && !(budget > 0)) throw new Error(`the bandwidth budget must be a number of MiB/s above 0 (got "${bandwidth}")`);
      const started = await api('POST', `/v1/hosts/${encodeURIComponent(host)}/drain`, { parallel, ...(budget === undefined ? {} : { bandwidthMiBs: budget }) });
      setDrains((previous) => new Map(previous).set(started.id, started));
      await refresh();
    });
  const onUndrain = (host) =>
    act(async () => {
      await api('POST', `/v1/hosts/${encodeURIComponent(host)}/undrain`, {});
      await refresh();
    });

  const record = selected === undefined ? undefined : migrations.get(selected);
  return html`
    <header><h1>vmferry</h1><span class="live ${live ? 'on' : ''}" data-testid="live-state">${live ? 'live' : 'connecting…'}</span></header>
    <main>
      ${error ? html`<div class="error" data-testid="error">${error}</div>` : ''}
      <div class="column">
        <${Hosts} hosts=${hosts} infos=${infos} busy=${busy} onDrain=${onDrain} onUndrain=${onUndrain} />
        <${Vms} vms=${vms} hosts=${hosts} onPlan=${onPlan} onMigrate=${onMigrate} busy=${busy} plan=${plan} />
      </div>
      <section>
        <h2>Migration</h2>
        <${LiveView} record=${record} progress=${progress.get(selected) ?? emptyProgress()} onCancel=${onCancel} />
      </section>
      <${Drains} drains=${drains} migrations=${migrations} progress=${progress} onSelect=${(id) => void select(id)} />
      <${Migrations} migrations=${migrations} selected=${selected} onSelect=${(id) => void select(id)} />
    </main>`;
}

render(html`<${App} />`, document.body);

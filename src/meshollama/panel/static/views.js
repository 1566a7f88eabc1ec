// The Mesh and Traffic tabs: pure rendering from the state the event stream keeps.

import { h, replace, $, shortId, ms, ago, clock } from './dom.js';
import { lineChart } from './charts.js';

const STATE_ORDER = { alive: 0, draining: 1, unreachable: 2, down: 3 };
export const PALETTE = 6;

function card(label, value, detail) {
  return h('div', { class: 'card' }, h('span', { class: 'card-label', text: label }),
    h('span', { class: 'card-value', text: value }), detail ? h('span', { class: 'card-detail', text: detail }) : null);
}

export function peerLabel(state, id) {
  if (!id || id === '(none)') return '(none)';
  if (id === '(other)') return 'other peers';
  return state.mesh && id === state.mesh.self_id ? `${shortId(id)} (this node)` : shortId(id);
}

export function renderMesh(state) {
  const mesh = state.mesh;
  if (!mesh) return;
  const c = mesh.counts || {};
  const alive = mesh.peers.filter((p) => p.state === 'alive' || p.state === 'draining');
  const inFlight = alive.reduce((n, p) => n + p.load.in_flight, 0);
  const capacity = alive.reduce((n, p) => n + p.load.capacity, 0);
  const queued = alive.reduce((n, p) => n + p.load.queued + (p.load.waiting || 0), 0);
  replace($('mesh-cards'),
    card('Peers up', `${c.alive + (c.draining || 0)} / ${c.total}`,
      [c.draining ? `${c.draining} draining` : '', c.down ? `${c.down} down` : '',
        c.unreachable ? `${c.unreachable} unreachable` : ''].filter(Boolean).join(', ') || 'all up'),
    card('Models', String(mesh.models), 'distinct names on live peers'),
    card('In flight', `${inFlight} / ${capacity}`, 'requests / slots'),
    card('Waiting', String(queued), 'queued for a slot'));
  const rows = [...mesh.peers].sort((a, b) => (b.is_self - a.is_self)
    || (STATE_ORDER[a.state] ?? 9) - (STATE_ORDER[b.state] ?? 9) || a.peer_id.localeCompare(b.peer_id));
  replace($('peers-body'), rows.map((p) => peerRow(state, p)));
  tickAges(state);
}

function peerRow(state, p) {
  const models = p.models.length
    ? h('ul', { class: 'plain' }, p.models.map((m) => h('li', {},
      h('span', { class: 'model-name', text: m.name }),
      m.loaded ? h('span', { class: 'badge loaded', text: 'loaded' }) : null)))
    : h('span', { class: 'muted', text: 'none' });
  const load = p.load;
  return h('tr', { 'data-peer': p.peer_id, 'data-state': p.state, class: p.is_self ? 'self' : null },
    h('th', { scope: 'row', 'data-label': 'Peer' },
      h('code', { title: p.peer_id, text: shortId(p.peer_id) }),
      p.is_self ? h('span', { class: 'badge self', text: 'this node' }) : null,
      p.relay ? h('span', { class: 'badge', text: 'relay' }) : null),
    h('td', { 'data-label': 'State' }, h('span', { class: `state state-${p.state}`, text: p.state })),
    h('td', { 'data-label': 'Version', text: p.version || '—' }),
    h('td', { 'data-label': 'Models' }, models),
    h('td', { 'data-label': 'Load' },
      h('span', { text: `${load.in_flight} / ${load.capacity}` }),
      h('meter', { min: 0, max: Math.max(1, load.capacity), value: load.in_flight,
        'aria-label': `${load.in_flight} of ${load.capacity} slots busy` }),
      load.queued ? h('span', { class: 'muted', text: ` ${load.queued} queued` }) : null),
    h('td', { 'data-label': 'Heartbeat', class: 'age', 'data-age': String(p.seconds_since_heartbeat) },
      ago(p.seconds_since_heartbeat)),
    h('td', { 'data-label': 'Addresses' }, p.addrs.length
      ? h('details', {}, h('summary', { text: `${p.addrs.length} address${p.addrs.length > 1 ? 'es' : ''}` }),
        h('ul', { class: 'plain addrs' }, p.addrs.map((a) => h('li', {}, h('code', { text: a })))))
      : h('span', { class: 'muted', text: 'none' })));
}

// Seconds since each heartbeat, aged locally from when the mesh event arrived (no request).
export function tickAges(state) {
  if (!state.meshAt) return;
  const extra = (performance.now() - state.meshAt) / 1000;
  for (const td of document.querySelectorAll('#peers-body td.age')) {
    td.textContent = `${ago(Number(td.dataset.age) + extra)} ago`;
  }
}

function keysByVolume(group) {
  return Object.entries(group || {}).sort((a, b) => b[1].requests - a[1].requests || a[0].localeCompare(b[0]));
}

function lastMinute(entry, t) {
  const n = Math.max(1, Math.round(60 / t.step));
  return entry.series.requests.slice(-n).reduce((a, b) => a + b, 0) / (n * t.step);
}

export function renderTraffic(state, by) {
  const t = state.traffic;
  if (!t) return;
  const label = (k) => (by === 'peers' ? peerLabel(state, k) : (k === '(other)' ? 'other models' : k));
  const keys = keysByVolume(t[by]);
  const shown = keys.slice(0, PALETTE);
  const series = (field, scale) => shown.map(([k, e], i) => ({
    name: label(k), cls: `s${i}`,
    values: e.series[field].map((v) => (v === null ? null : v * scale)),
  }));
  const xLabel = (i) => {
    const back = (t.points - 1 - i) * t.step;
    return back === 0 ? 'now' : `−${Math.round(back / 60)} min`;
  };
  const perSecond = 1 / t.step;
  lineChart($('chart-rps'), series('requests', perSecond),
    { label: `Requests per second by ${by === 'peers' ? 'peer' : 'model'}, last ${t.window / 60} minutes`,
      format: (v) => v.toFixed(v < 1 ? 2 : 1), xLabel });
  lineChart($('chart-ttfb'), series('ttfb_mean', 1000),
    { label: 'Mean time to first byte in milliseconds', format: (v) => `${Math.round(v)}`, xLabel });
  lineChart($('chart-errors'), series('errors', perSecond),
    { label: 'Errors per second', format: (v) => v.toFixed(v < 1 ? 2 : 1), xLabel });
  const legend = shown.map(([k], i) => h('li', {}, h('span', { class: `swatch s${i}`, 'aria-hidden': 'true' }), label(k)));
  for (const id of ['legend-rps', 'legend-ttfb', 'legend-errors']) replace($(id), legend.map((li) => li.cloneNode(true)));
  $('traffic-key-head').textContent = by === 'peers' ? 'Peer' : 'Model';
  const total = t.total;
  replace($('traffic-body'), [...keys, ['(all)', total]].map(([k, e]) => h('tr', { class: k === '(all)' ? 'total' : null },
    h('th', { scope: 'row', text: k === '(all)' ? 'All' : label(k) }),
    h('td', { class: 'num', text: String(e.requests) }),
    h('td', { class: 'num', text: lastMinute(e, t).toFixed(2) }),
    h('td', { class: `num${e.errors ? ' bad' : ''}`, text: String(e.errors) }),
    h('td', { class: 'num', text: ms(e.ttfb_mean) }),
    h('td', { class: 'num', text: ms(e.ttfb_max) }))));
  replace($('recent-body'), t.recent.length ? t.recent.map((r) => h('tr', {},
    h('td', { text: clock(r.at) }),
    h('td', {}, h('code', { text: r.endpoint })),
    h('td', { text: r.model || '—' }),
    h('td', { title: r.peer || '', text: peerLabel(state, r.peer) }),
    h('td', { class: `num${r.status >= 500 || r.status === 0 ? ' bad' : ''}`, text: String(r.status) }),
    h('td', { class: 'num', text: ms(r.ttfb) }),
    h('td', { class: 'num', text: ms(r.duration) }))) : h('tr', {}, h('td', { colspan: 7, class: 'muted', text: 'no requests yet' })));
}

// The Models tab: every model in the mesh with its holders; for admins pull, delete and copy count.

import { h, replace, $, bytes } from './dom.js';
import { peerLabel } from './views.js';

// Re-rendering must not steal focus or typed text from an element the user is on.
export function keepingFocus(render) {
  const active = document.activeElement;
  const id = active && active.id;
  const value = active && 'value' in active ? active.value : null;
  render();
  if (!id) return;
  const again = document.getElementById(id);
  if (again && again !== active) {
    if (value !== null && again.tagName === 'INPUT') again.value = value;
    again.focus();
  }
}

function holders(state, row) {
  return h('ul', { class: 'plain' }, row.holders.map((x) => h('li', { 'data-peer': x.peer },
    h('span', { text: peerLabel(state, x.peer) }), ' ',
    h('span', { class: `state state-${x.state}`, text: x.state }),
    x.loaded ? h('span', { class: 'badge loaded', text: 'loaded' }) : null)));
}

function pulling(row) {
  const p = row.pulling;
  if (!p && !row.replicating) return null;
  const text = p ? p.status || 'pulling' : 'replicating';
  return h('div', { class: 'row-progress' }, h('span', { class: 'muted', text }),
    p && p.total ? h('progress', { max: p.total, value: p.completed || 0, 'aria-label': `${row.model}: ${text}` }) : null);
}

export function renderModels(state, ctx) {
  const data = state.models;
  if (!data) return;
  const admin = ctx.isAdmin();
  document.body.classList.toggle('admin', admin);
  $('pull-form').hidden = !admin;
  $('models-actions-head').hidden = !admin;
  keepingFocus(() => replace($('models-body'), data.models.length ? data.models.map((row) => {
    const mine = row.holders.some((x) => x.self);
    const target = row.copies_target;
    const copies = h('td', { 'data-label': 'Copies', class: 'num' },
      h('span', { text: target ? `${row.copies} of ${target}` : String(row.copies) }),
      row.last_error ? h('span', { class: 'bad small', text: ` ${row.last_error}` }) : null);
    const actions = admin ? h('td', { 'data-label': 'Actions' }, h('div', { class: 'actions' },
      data.can_replicate ? h('form', { class: 'copies', 'data-model': row.model, onsubmit: (e) => ctx.setCopies(e, row.model) },
        h('input', { id: `copies-${row.model}`, type: 'number', min: 0, max: 64, required: true,
          value: target || row.copies, inputmode: 'numeric', 'aria-label': `Copies of ${row.model} to keep in the mesh` }),
        h('button', { type: 'submit', id: `copies-set-${row.model}`, text: 'Set copies' })) : null,
      mine && data.can_delete ? h('button', { type: 'button', class: 'danger', id: `delete-${row.model}`,
        'aria-label': `Delete ${row.model} from this node`, text: 'Delete', onclick: () => ctx.remove(row.model) }) : null))
      : null;
    return h('tr', { 'data-model': row.model },
      h('th', { scope: 'row', 'data-label': 'Model' }, h('span', { class: 'model-name', text: row.model }), pulling(row)),
      h('td', { 'data-label': 'Size', class: 'num', text: bytes(row.size) }),
      h('td', { 'data-label': 'Holders' }, holders(state, row)),
      copies, actions);
  }) : h('tr', {}, h('td', { colspan: 5, class: 'muted', text: 'no models in the mesh yet' }))));
  const store = data.store;
  $('store-info').textContent = store
    ? `This node keeps models in ${store.root} (${store.kind}), ${bytes(store.free)} free.` : '';
}

// POST /api/pull, streamed: one progress bar per layer, the last status line as text.
export async function pull(ctx, name) {
  const out = $('pull-progress');
  const status = h('p', { class: 'pull-status', role: 'status', text: `pulling ${name}…` });
  const bars = h('div', { class: 'bars' });
  replace(out, status, bars);
  const layers = new Map();
  let failed = null;
  let last = '';
  try {
    const resp = await ctx.api('/api/pull', { method: 'POST', body: { model: name, stream: true } });
    if (!resp.ok) {
      failed = await ctx.errorText(resp);
    } else {
      await ctx.readLines(resp, (obj) => {
        if (obj.error) { failed = obj.error; return; }
        last = obj.status || last;
        if (obj.digest && obj.total) {
          let bar = layers.get(obj.digest);
          if (!bar) {
            bar = h('progress', { max: obj.total, value: 0, 'aria-label': `layer ${obj.digest.slice(7, 19)}` });
            layers.set(obj.digest, bar);
            bars.append(h('div', { class: 'bar' }, h('code', { text: obj.digest.slice(7, 19) }), bar));
          }
          bar.value = obj.completed || 0;
          const pct = Math.floor((100 * (obj.completed || 0)) / obj.total);
          status.textContent = `${name}: ${last} (${pct}%)`;
        } else {
          status.textContent = `${name}: ${last}`;
        }
      });
    }
  } catch (err) {
    failed = String(err.message || err);
  }
  if (failed) {
    status.textContent = `${name}: failed: ${failed}`;
    status.classList.add('bad');
  } else if (last !== 'success') {
    status.textContent = `${name}: the pull ended without success (${last || 'no answer'})`;
    status.classList.add('bad');
  }
  return !failed && last === 'success';
}

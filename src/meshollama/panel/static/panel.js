// The panel's entry point: sign-in, tabs, the live event stream, admin actions.

import { $, replace } from './dom.js';
import { connect } from './sse.js';
import { renderMesh, renderTraffic, tickAges, peerLabel } from './views.js';
import { renderModels, pull } from './models.js';
import { renderChatModels, setupChat } from './chat.js';

const KEY = 'meshollama.key';
const ROLES = { readonly: 1, user: 2, admin: 3 };
const state = { hello: null, mesh: null, meshAt: 0, models: null, traffic: null, by: 'peers' };
let stream = null;

// --- credentials: sessionStorage, or localStorage when "remember on this device" was ticked.

function token() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || '';
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function api(path, { method = 'GET', body, signal } = {}) {
  const headers = { ...authHeaders() };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method, headers, signal, cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401) showLogin('Your key was not accepted any more: sign in again.');
  return resp;
}

async function errorText(resp) {
  try {
    const obj = await resp.json();
    const e = obj.error;
    return `${resp.status}: ${typeof e === 'string' ? e : (e && e.message) || JSON.stringify(obj)}`;
  } catch (err) {
    return `HTTP ${resp.status}`;
  }
}

// Calls onLine(obj) for every JSON line of an NDJSON body, as it arrives.
async function readLines(resp, onLine) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line) onLine(JSON.parse(line));
    }
  }
  if (buf.trim()) onLine(JSON.parse(buf));
}

function role() {
  return (state.hello && ROLES[state.hello.role]) || 0;
}

const ctx = {
  api, errorText, readLines,
  isAdmin: () => role() >= ROLES.admin,
  peerLabel: (id) => peerLabel(state, id),
  setCopies, remove,
};

// --- sign-in

function showLogin(message) {
  if (stream) { stream.close(); stream = null; }
  $('main').hidden = true;
  $('who').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  setConn('signed out', 'off');
  $('key').focus();
}

$('login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const key = $('key').value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  if ($('remember').checked) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
  $('key').value = '';
  start();
});

$('signout').addEventListener('click', () => {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  showLogin('Signed out.');
});

// --- tabs (WAI-ARIA tabs: arrow keys move between them, Home/End jump)

const tabs = [...document.querySelectorAll('[role="tab"]')];

function select(tab, focus) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute('aria-selected', String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute('aria-controls')).hidden = !on;
  }
  if (focus) tab.focus();
  history.replaceState(null, '', `#${tab.id.slice(4)}`);
  if (tab.id === 'tab-traffic') renderTraffic(state, state.by);
}

for (const tab of tabs) {
  tab.addEventListener('click', () => select(tab, false));
  tab.addEventListener('keydown', (e) => {
    const i = tabs.indexOf(tab);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    select(tabs[(to + tabs.length) % tabs.length], true);
  });
}
select($(`tab-${location.hash.slice(1)}`) || tabs[0], false);

for (const radio of document.querySelectorAll('input[name="by"]')) {
  radio.addEventListener('change', () => { state.by = radio.value; renderTraffic(state, state.by); });
}

// --- the event stream

function setConn(text, kind) {
  const el = $('conn');
  el.textContent = text;
  el.dataset.state = kind;
}

function onEvent(name, data) {
  if (name === 'hello') {
    state.hello = data;
    $('login').hidden = true;
    $('main').hidden = false;
    $('who').hidden = data.open;
    $('role').textContent = `${data.name ? `${data.name}, ` : ''}${data.role}`;
    $('node').textContent = `node ${data.self_id.slice(0, 6)}…${data.self_id.slice(-6)}, version ${data.version}`;
    $('node').title = data.self_id;
    const mayChat = role() >= ROLES.user;
    $('chat-form').dataset.allowed = mayChat ? 'yes' : '';
    $('chat-readonly').hidden = mayChat;
    $('chat-send').disabled = !mayChat;
    if (state.models) renderModels(state, ctx);
  } else if (name === 'mesh') {
    state.mesh = data;
    state.meshAt = performance.now();
    renderMesh(state);
  } else if (name === 'models') {
    state.models = data;
    renderModels(state, ctx);
    renderChatModels(state);
  } else if (name === 'traffic') {
    state.traffic = data;
    if (!$('panel-traffic').hidden) renderTraffic(state, state.by);
  } else if (name === 'bye') {
    if (data.reason === 'credential no longer valid') {
      // The key was revoked (or the node now needs one): this page may read nothing more.
      showLogin(token() ? 'That key is no longer accepted.' : 'This node needs an API key now.');
    } else {
      setConn(data.reason === 'shutting down' ? 'the node is restarting…' : 'reconnecting…', 'waiting');
    }
  }
}

function start() {
  if (stream) stream.close();
  stream = connect({
    url: '/api/mesh/events',
    headers: authHeaders,
    onEvent,
    onStatus: (s, delay, message) => {
      if (s === 'live') setConn('live', 'live');
      else if (s === 'waiting') setConn(`disconnected: retrying in ${Math.ceil(delay / 1000)} s`, 'waiting');
      else if (s === 'error') setConn(`${message}: retrying in ${Math.ceil(delay / 1000)} s`, 'off');
      else setConn(s === 'connecting' ? 'connecting…' : 'reconnecting…', 'waiting');
    },
    onAuth: (status, message) => showLogin(status === 401
      ? (token() ? 'That key was not accepted.' : 'This node needs an API key.')
      : `This key may not read the mesh${message ? `: ${message}` : ''}.`),
  });
}

// --- admin actions

async function setCopies(e, model) {
  e.preventDefault();
  const copies = Number(e.target.querySelector('input').value);
  const resp = await api('/api/mesh/replicate', { method: 'POST', body: { model, copies } });
  note(resp.ok ? `${model}: keeping ${copies} ${copies === 1 ? 'copy' : 'copies'} in the mesh.` : `${model}: ${await errorText(resp)}`,
    !resp.ok);
}

async function remove(model) {
  const dialog = $('confirm');
  $('confirm-text').textContent = `Delete ${model} from this node? Other holders keep their copies.`;
  dialog.returnValue = '';
  dialog.showModal();
  $('confirm-cancel').focus();
  await new Promise((resolve) => dialog.addEventListener('close', resolve, { once: true }));
  if (dialog.returnValue !== 'delete') return;
  const resp = await api('/api/delete', { method: 'DELETE', body: { model } });
  note(resp.ok ? `${model}: deleted from this node.` : `${model}: ${await errorText(resp)}`, !resp.ok);
}

function note(text, bad) {
  const el = $('models-msg');
  el.textContent = text;
  el.classList.toggle('bad', Boolean(bad));
}

$('confirm-delete').addEventListener('click', () => $('confirm').close('delete'));
$('confirm-cancel').addEventListener('click', () => $('confirm').close('cancel'));

$('pull-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const name = $('pull-name').value.trim();
  if (!name) return;
  const button = $('pull-button');
  button.disabled = true;
  try {
    if (await pull(ctx, name)) $('pull-name').value = '';
  } finally {
    button.disabled = false;
  }
});

setupChat(ctx);
setInterval(() => tickAges(state), 1000); // local only: ages the heartbeat times, no request
replace($('transcript'));
start();
window.meshollamaPanel = { state, version: 1 };

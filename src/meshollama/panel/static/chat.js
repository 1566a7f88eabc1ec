// The chat playground: POST /api/chat, streamed NDJSON, through this node's gateway
// (so the mesh routes it like any client's request).

import { h, replace, $ } from './dom.js';

export function renderChatModels(state) {
  const select = $('chat-model');
  const wanted = select.value;
  const names = state.models ? state.models.models
    .filter((r) => r.holders.some((x) => x.state === 'alive' || x.state === 'draining'))
    .map((r) => r.model) : [];
  const current = [...select.options].map((o) => o.value);
  if (names.join('\n') === current.join('\n')) return;
  replace(select, names.map((n) => h('option', { value: n, text: n })));
  if (names.includes(wanted)) select.value = wanted;
  $('chat-send').disabled = !names.length || !$('chat-form').dataset.allowed;
}

export function setupChat(ctx) {
  const form = $('chat-form');
  const input = $('chat-input');
  const transcript = $('transcript');
  const stop = $('chat-stop');
  const history = [];
  let controller = null;

  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });
  stop.addEventListener('click', () => controller && controller.abort());
  $('chat-clear').addEventListener('click', () => {
    if (controller) controller.abort();
    history.length = 0;
    replace(transcript);
  });

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    const model = $('chat-model').value;
    if (!text || !model || controller) return;
    input.value = '';
    history.push({ role: 'user', content: text });
    transcript.append(h('div', { class: 'msg user' }, h('span', { class: 'who', text: 'You' }), h('p', { text })));
    const body = h('p', { class: 'content' });
    const meta = h('p', { class: 'meta', text: `${model}: waiting for the first token…` });
    const reply = h('div', { class: 'msg assistant', 'aria-busy': 'true' },
      h('span', { class: 'who', text: model }), body, meta);
    transcript.append(reply);
    reply.scrollIntoView({ block: 'end' });
    controller = new AbortController();
    stop.disabled = false;
    $('chat-send').disabled = true;
    let answer = '';
    let final = null;
    let failure = null;
    const started = performance.now();
    try {
      const resp = await ctx.api('/api/chat', { method: 'POST', signal: controller.signal,
        body: { model, messages: history, stream: true } });
      const peer = resp.headers.get('x-meshollama-peer');
      if (!resp.ok) {
        failure = await ctx.errorText(resp);
      } else {
        meta.textContent = `${model} on ${peer ? ctx.peerLabel(peer) : 'this node'}: streaming…`;
        await ctx.readLines(resp, (obj) => {
          if (obj.error) { failure = obj.error; return; }
          const piece = (obj.message && obj.message.content) || '';
          if (piece) {
            answer += piece;
            body.textContent = answer;
          }
          if (obj.done) final = obj;
        });
        if (final) {
          const tokens = final.eval_count || 0;
          const secs = final.eval_duration ? final.eval_duration / 1e9 : (performance.now() - started) / 1000;
          meta.textContent = `${model} on ${peer ? ctx.peerLabel(peer) : 'this node'}: ${tokens} tokens`
            + `${tokens && secs ? `, ${(tokens / secs).toFixed(1)} tokens/s` : ''}, ${final.done_reason || 'done'}`;
        }
      }
    } catch (err) {
      failure = err.name === 'AbortError' ? 'stopped' : String(err.message || err);
    }
    if (failure) {
      meta.textContent = `${model}: ${failure}`;
      meta.classList.add('bad');
    }
    if (answer) history.push({ role: 'assistant', content: answer });
    else history.pop();
    reply.setAttribute('aria-busy', 'false');
    reply.dataset.done = failure ? 'error' : 'done';
    controller = null;
    stop.disabled = true;
    $('chat-send').disabled = false;
    input.focus();
  });
}

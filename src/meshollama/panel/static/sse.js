// Server-Sent Events over fetch(): EventSource cannot send an Authorization header,
// so the stream is read with fetch() and a ReadableStream and parsed here.

export class SSEParser {
  // onEvent(name, data) per event; onRetry(ms) for a retry: field; onComment() for ": ..." lines.
  constructor(onEvent, onRetry = () => {}, onComment = () => {}) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.onComment = onComment;
    this.buf = '';
    this.reset();
  }

  reset() {
    this.event = '';
    this.data = [];
  }

  push(text) {
    this.buf += text;
    for (;;) {
      const i = this.buf.search(/[\r\n]/);
      if (i < 0) return;
      if (this.buf[i] === '\r' && i === this.buf.length - 1) return; // a \r\n may be split across chunks
      const line = this.buf.slice(0, i);
      this.buf = this.buf.slice(this.buf[i] === '\r' && this.buf[i + 1] === '\n' ? i + 2 : i + 1);
      this.line(line);
    }
  }

  line(line) {
    if (line === '') {
      if (this.data.length) this.onEvent(this.event || 'message', this.data.join('\n'));
      this.reset();
      return;
    }
    if (line.startsWith(':')) {
      this.onComment(line.slice(1));
      return;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'retry' && /^\d+$/.test(value)) this.onRetry(Number(value));
  }
}

const MAX_DELAY = 30000;

// Keeps one event stream open: reconnects with exponential backoff (and jitter) when it
// ends or fails, and gives up only on 401/403 (the caller must sign in again).
// A stream that ends with `event: error` (the node could not build an update) backs off
// further each time, even though each new stream says hello first.
// opts: url, headers() -> object, onEvent(name, obj), onStatus(state, delay, message), onAuth(status, message)
export function connect(opts) {
  let stopped = false;
  let attempt = 0;
  let failures = 0; // streams in a row that ended with an error event
  let base = 2000;
  let controller = null;
  let wake = null;
  let watchdog = null;
  let idleLimit = 45000;

  const sleep = (ms) => new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    wake = () => { clearTimeout(t); resolve(); };
  });

  function arm() {
    clearTimeout(watchdog);
    // Nothing at all (not even the keep-alive comment) for this long: the link is dead.
    watchdog = setTimeout(() => controller && controller.abort(), idleLimit);
  }

  async function once() {
    controller = new AbortController();
    const resp = await fetch(opts.url, {
      headers: { Accept: 'text/event-stream', ...opts.headers() },
      cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer', signal: controller.signal,
    });
    if (resp.status === 401 || resp.status === 403) {
      let message = '';
      try { message = (await resp.json()).error || ''; } catch (e) { /* not JSON */ }
      return { auth: resp.status, message };
    }
    if (resp.status === 503) {
      const after = Number(resp.headers.get('retry-after'));
      return { delay: Number.isFinite(after) && after > 0 ? after * 1000 : null };
    }
    if (!resp.ok || !resp.body) return {};
    const outcome = {};
    const parser = new SSEParser((name, data) => {
      let obj = null;
      try { obj = JSON.parse(data); } catch (e) { return; }
      if (name === 'hello') {
        attempt = 0;
        if (obj.heartbeat) idleLimit = obj.heartbeat * 3000;
        opts.onStatus('live');
      } else if (name === 'error') {
        outcome.error = (obj && typeof obj.message === 'string' && obj.message) || 'the event stream failed';
      }
      opts.onEvent(name, obj);
    }, (ms) => { base = Math.max(500, Math.min(ms, MAX_DELAY)); });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    arm();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        parser.push(value);
      }
    } finally {
      clearTimeout(watchdog);
    }
    return outcome;
  }

  async function run() {
    while (!stopped) {
      opts.onStatus(attempt ? 'reconnecting' : 'connecting');
      let outcome = {};
      try {
        outcome = await once();
      } catch (err) {
        outcome = {};
      }
      if (stopped) return;
      if (outcome.auth) {
        opts.onAuth(outcome.auth, outcome.message);
        return;
      }
      failures = outcome.error ? Math.min(failures + 1, 10) : 0;
      const backoff = Math.min(MAX_DELAY, base * 2 ** Math.max(attempt, failures)) * (0.75 + Math.random() * 0.5);
      const delay = outcome.delay || backoff;
      attempt = Math.min(attempt + 1, 10);
      opts.onStatus(outcome.error ? 'error' : 'waiting', delay, outcome.error);
      await sleep(delay);
    }
  }

  run();
  return {
    close() {
      stopped = true;
      clearTimeout(watchdog);
      if (controller) controller.abort();
      if (wake) wake();
    },
  };
}

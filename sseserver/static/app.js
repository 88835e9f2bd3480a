// sseserver demo page. Short prompts stream over EventSource (which reconnects by itself
// with Last-Event-ID); long prompts are POSTed and the SSE body is parsed here. Either
// way every event carries id "{gen}:{seq}", and an event at or below the last seq applied
// is a replay after a reconnect: it is dropped, so text is never cleared nor duplicated.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const page = new URLSearchParams(location.search);
  const token = page.get('access_token'); // EventSource cannot send headers: §9 query token
  const watchGen = page.get('watch');
  // Synthetic provider knobs (§6) forwarded from the page URL, so tests can shape a stream.
  const SYNTH = ['tokens', 'interval_ms', 'size', 'ttft_ms'];
  const MAX_GET_PROMPT = 1500; // longer prompts go by POST: request heads are bounded (431)
  const FALLBACK = { default: 'synthetic',
    providers: [{ name: 'synthetic', default_model: 'synthetic-1', models: ['synthetic-1'] }] };

  // Stable hooks for browser tests, updated live.
  const demo = (window.sseDemo = { generationId: null, lastSeq: null, reconnects: 0, state: 'idle' });
  const lastSeqs = new Map(); // generation id -> last seq applied
  let turn = null; // the current answer being streamed (or the last finished one)

  function url(path, query = {}) {
    const u = new URL(path, location.origin);
    for (const [k, v] of Object.entries(query)) if (v != null && v !== '') u.searchParams.set(k, v);
    if (token) u.searchParams.set('access_token', token);
    return u.pathname + u.search;
  }

  function setState(word, detail) {
    demo.state = word;
    document.body.dataset.state = word;
    $('state').textContent =
      word === 'reconnecting' ? 'reconnecting…' : word === 'error' ? `error: ${detail || 'unknown'}` : word;
  }

  function setBusy(busy) {
    $('send').disabled = busy;
    $('stop').disabled = !busy;
    $('answer').setAttribute('aria-busy', String(busy)); // screen readers wait for the whole answer
  }

  const fmt = (n, digits) => (Number.isFinite(n) ? n.toFixed(digits) : '—');
  const parseJSON = (s) => { try { return JSON.parse(s); } catch { return null; } };

  function parseId(id) {
    const i = id ? id.lastIndexOf(':') : -1;
    const seq = i < 0 ? NaN : Number(id.slice(i + 1));
    return Number.isInteger(seq) ? { gen: id.slice(0, i), seq } : null;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    e.className = cls;
    e.textContent = text; // model text is only ever set as text, never parsed as HTML
    return e;
  }

  // Keep the newest text in view, unless the user scrolled up to read; once per frame.
  let scrollQueued = false;
  function follow() {
    if (scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      const d = document.documentElement;
      if (d.scrollHeight - d.scrollTop - d.clientHeight < 160) d.scrollTop = d.scrollHeight;
    });
  }

  // ---- turns ----------------------------------------------------------------------------

  function begin(question, gen) {
    const t = { gen: null, question, done: false, seen: false, final: false, error: null,
      t0: gen ? null : performance.now(), firstAt: 0, tokens: 0, es: null, ctrl: null,
      text: document.createTextNode('') };
    $('answer').replaceChildren(t.text);
    $('question').textContent = question;
    $('question').hidden = !question;
    $('ttft').textContent = $('tps').textContent = '—';
    $('extra').textContent = '';
    $('watch').hidden = true;
    Object.assign(demo, { generationId: null, lastSeq: null, reconnects: 0 });
    turn = t;
    setState('connecting');
    setBusy(true);
    if (gen) adopt(t, gen);
    return t;
  }

  // Move the finished turn into the conversation list, so #answer always means "current".
  function archive() {
    if (!turn) return;
    const li = el('li', 'turn', '');
    const meta = `${$('state').textContent} · TTFT ${$('ttft').textContent} ms · ${$('tps').textContent} tokens/s`;
    li.append(el('p', 'q', turn.question), el('div', 'a', turn.text.data), el('p', 'meta', meta));
    $('history').append(li);
  }

  function adopt(t, gen) {
    if (t.gen && t.gen !== gen) {
      // The server started a new generation (the old one was unknown on reconnect):
      // its text starts over, so showing both would duplicate the answer.
      t.text.data = '';
      t.tokens = 0;
      t.firstAt = 0;
    }
    t.gen = gen;
    demo.generationId = gen;
    demo.lastSeq = lastSeqs.get(gen) ?? null;
    const a = $('watch');
    a.href = url('/', { watch: gen });
    a.hidden = Boolean(watchGen);
  }

  function close(t) {
    if (t.es) t.es.close(); // closing stops EventSource's automatic reconnect
    if (t.ctrl) t.ctrl.abort();
  }

  function finish(t, word, detail) {
    if (t.done) return;
    t.done = true;
    close(t);
    if (t === turn) {
      setState(word, detail ?? t.error);
      setBusy(false);
    }
  }
  const ended = (t) => finish(t, t.error ? 'error' : 'done'); // an error outlives [DONE]

  // One handler for both transports: (event type, data, id) as the SSE spec dispatches them.
  function handle(t, type, raw, id) {
    if (t !== turn || t.done) return; // a stopped or superseded turn renders nothing more
    const pid = parseId(id);
    if (pid) {
      if (pid.gen !== t.gen) {
        if (t.gen && type !== 'start') return; // stray event of another generation
        adopt(t, pid.gen);
      }
      const last = lastSeqs.get(pid.gen);
      if (last !== undefined && pid.seq <= last) return; // replayed after a reconnect
      lastSeqs.set(pid.gen, pid.seq);
      demo.lastSeq = pid.seq;
    }
    t.seen = true;
    if (type === 'message' && raw === '[DONE]') return ended(t);
    const d = parseJSON(raw);
    if (!d || typeof d !== 'object') return;
    if (type === 'start') {
      if (!t.gen && d.id) adopt(t, String(d.id));
      if (!t.error) setState('streaming');
    } else if (type === 'message' && typeof d.text === 'string') {
      const now = performance.now();
      if (!t.firstAt) {
        t.firstAt = now;
        if (t.t0 != null && !t.final) $('ttft').textContent = fmt(now - t.t0, 0);
      }
      t.tokens++;
      t.text.appendData(d.text); // a text node: model output is never interpreted as markup
      if (!t.final && t.tokens > 1) $('tps').textContent = fmt((t.tokens - 1) / ((now - t.firstAt) / 1000), 1);
      if (!t.error && demo.state !== 'streaming') setState('streaming');
      follow();
    } else if (type === 'metrics') {
      t.final = true; // the server's own figures replace the live estimates
      $('ttft').textContent = fmt(d.ttft_ms, 0);
      $('tps').textContent = fmt(d.tokens_per_s, 1);
      $('extra').textContent = `${d.tokens ?? '?'} tokens in ${fmt(d.duration_ms, 0)} ms`;
    } else if (type === 'error') {
      t.error = String(d.message || d.code || 'stream error'); // metrics and [DONE] may follow
      setState('error', t.error);
    }
  }

  // ---- EventSource transport ------------------------------------------------------------

  function openEventSource(t, src) {
    const es = (t.es = new EventSource(src));
    es.onopen = () => { if (!t.done && !t.error) setState('streaming'); };
    for (const type of ['start', 'message', 'metrics']) {
      es.addEventListener(type, (e) => handle(t, type, e.data, e.lastEventId));
    }
    es.addEventListener('error', (e) => {
      // The server's "event: error" arrives on the same listener as a connection error.
      if (typeof e.data === 'string') return handle(t, 'error', e.data, e.lastEventId);
      if (t.done || t !== turn) return;
      if (es.readyState === EventSource.CONNECTING) {
        demo.reconnects++;
        setState('reconnecting');
      } else if (t.seen || demo.reconnects) {
        ended(t); // a reconnect answered 204: the generation is over
      } else {
        finish(t, 'error', 'could not connect');
      }
    });
  }

  // ---- fetch transport (long prompts) ---------------------------------------------------

  // Incremental SSE parser (WHATWG): lines end at CRLF, LF or CR; data lines join with \n.
  function sseParser(onEvent) {
    let buf = '', data = [], type = '', lastId = '';
    function line(l) {
      if (l === '') {
        if (data.length) onEvent(type || 'message', data.join('\n'), lastId);
        data = [];
        type = '';
        return;
      }
      if (l[0] === ':') return; // comment, e.g. the heartbeat
      const i = l.indexOf(':');
      const field = i < 0 ? l : l.slice(0, i);
      let value = i < 0 ? '' : l.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') data.push(value);
      else if (field === 'event') type = value;
      else if (field === 'id' && !value.includes('\0')) lastId = value;
    }
    return (chunk) => {
      buf += chunk;
      const re = /\r\n|\r|\n/g;
      let start = 0, m;
      while ((m = re.exec(buf))) {
        // A CR at the end of a chunk may be the first half of a CRLF: wait for more.
        if (m[0] === '\r' && m.index === buf.length - 1) break;
        line(buf.slice(start, m.index));
        start = re.lastIndex;
      }
      buf = buf.slice(start);
    };
  }

  async function httpError(res) {
    let msg = res.statusText;
    const j = parseJSON(await res.text().catch(() => ''));
    if (j) msg = j.message || j.error?.message || (typeof j.error === 'string' ? j.error : '') || msg;
    const err = new Error(`HTTP ${res.status}${msg ? ` ${msg}` : ''}`);
    err.status = res.status;
    return err;
  }

  async function readSSE(t, src, init) {
    const res = await fetch(src, { ...init, signal: t.ctrl.signal, cache: 'no-store' });
    if (res.status === 204) return ended(t); // resumed past the end
    if (!res.ok) throw await httpError(res);
    if (!t.error) setState('streaming');
    const feed = sseParser((type, data, id) => handle(t, type, data, id));
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    while (!t.done) {
      const { value, done } = await reader.read();
      if (done) return;
      feed(value);
    }
  }

  async function openFetch(t, body) {
    t.ctrl = new AbortController();
    let src = url('/v1/stream');
    let init = { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) };
    for (let tries = 0; ; tries++) {
      try {
        await readSSE(t, src, init);
      } catch (e) {
        if (t.done) return; // aborted by Stop or [DONE]
        // A refusal (4xx/5xx) is final; without a generation id there is nothing to resume.
        if (e.status || !t.gen) return finish(t, 'error', e.message);
      }
      if (t.done) return;
      if (!t.gen || tries >= 5) return finish(t, 'error', 'connection lost');
      // The body ended early: rejoin the generation after the last event applied (§8).
      demo.reconnects++;
      setState('reconnecting');
      await new Promise((r) => setTimeout(r, 1000));
      if (t.done) return;
      src = url(`/v1/streams/${encodeURIComponent(t.gen)}`);
      init = { headers: { 'Last-Event-ID': `${t.gen}:${lastSeqs.get(t.gen)}` } };
    }
  }

  // ---- UI actions -----------------------------------------------------------------------

  function send() {
    const text = $('prompt').value.trim();
    if (!text || (turn && !turn.done)) return;
    archive();
    $('prompt').value = '';
    const provider = $('provider').value || undefined;
    const model = $('model').value || undefined;
    const synth = {};
    for (const k of SYNTH) if (page.has(k)) synth[k] = page.get(k);
    const t = begin(text);
    if (text.length <= MAX_GET_PROMPT && encodeURIComponent(text).length <= 6000) {
      openEventSource(t, url('/v1/stream', { provider, model, q: text, ...synth }));
    } else {
      const params = Object.fromEntries(Object.entries(synth).map(([k, v]) => [k, Number(v)]));
      openFetch(t, { provider, model, messages: [{ role: 'user', content: text }], params });
    }
  }

  async function stop() {
    const t = turn;
    if (!t || t.done) return;
    t.done = true; // from now on nothing of this turn is rendered, and errors are ignored
    setState('stopped');
    setBusy(false);
    if (t.gen) {
      // Cancel first, so the upstream stops now rather than when the disconnect is noticed.
      const signal = AbortSignal.timeout ? AbortSignal.timeout(3000) : undefined;
      await fetch(url(`/v1/streams/${encodeURIComponent(t.gen)}/cancel`), { method: 'POST', signal })
        .catch(() => {});
    }
    close(t);
  }

  async function loadProviders() {
    let info = FALLBACK;
    try {
      const res = await fetch(url('/v1/providers'), { cache: 'no-store' });
      const j = res.ok ? await res.json() : null;
      if (Array.isArray(j?.providers) && j.providers.length) info = j;
    } catch { /* offline or older server: the synthetic provider is always there */ }
    const sel = $('provider');
    sel.replaceChildren(...info.providers.map((p) => new Option(p.name, p.name)));
    if (info.providers.some((p) => p.name === info.default)) sel.value = info.default;
    const fill = () => {
      const p = info.providers.find((x) => x.name === sel.value) || {};
      const models = [...(p.models || [])];
      if (p.default_model && !models.includes(p.default_model)) models.unshift(p.default_model);
      $('model').replaceChildren(...models.map((m) => new Option(m, m)));
      if (p.default_model) $('model').value = p.default_model;
    };
    sel.addEventListener('change', fill);
    fill();
  }

  // ---- start ----------------------------------------------------------------------------

  if (watchGen) {
    // Read-only viewer of someone else's generation: replay, then live (§8).
    $('composer').hidden = true;
    $('note').textContent = `Watching generation ${watchGen} (read-only).`;
    $('note').hidden = false;
    openEventSource(begin('', watchGen), url(`/v1/streams/${encodeURIComponent(watchGen)}`));
  } else {
    setBusy(false);
    loadProviders();
    $('composer').addEventListener('submit', (e) => { e.preventDefault(); send(); });
    $('prompt').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    $('stop').addEventListener('click', stop);
  }
})();

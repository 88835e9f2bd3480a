// A fast local OpenAI-compatible upstream for the proxy benchmark: Node's `http`, no packages.
//
// The Python fake of the tests (tests/upstreams/openai_wire.py) is the reference for the wire
// format and the directive syntax; this one exists because a Python upstream sharing the load
// generator's core is itself the bottleneck at thousands of chunks per second.
//
//   POST /v1/chat/completions (or /chat/completions)
//     "stream": true   200, text/event-stream, chunked: a first chunk with the assistant
//                      role and empty content, one chat.completion.chunk per content delta on
//                      absolute deadlines (no drift), one with finish_reason and an empty
//                      delta, then, when stream_options.include_usage, one with choices: []
//                      and usage (all others then carry "usage": null), then data: [DONE]
//     otherwise        one chat.completion JSON object
//   GET /healthz       ok
//
// Behaviour per request from `[fake key=value ...]` blocks in the messages' text (sseserver
// puts the `q` of /v1/stream into the last user message) or an `X-Fake-Control: key=value`
// header, over --default. Keys: tokens (default 5), interval_ms, ttft_ms; any other key is
// answered with 400 (the Python fake's failure modes are not reproduced here). Token i's text
// is exactly `tok${i} ` (tests.upstreams.token_text). max_tokens / max_completion_tokens below
// tokens cut the answer with finish_reason "length". Connections are kept alive.
//
//   node bench/peers/openai_upstream.js --port 0    # prints "LISTENING http://127.0.0.1:PORT"
'use strict';

const http = require('http');
const { performance } = require('perf_hooks');

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const HOST = arg('--host', '127.0.0.1');
const PORT = Number(arg('--port', '0'));
const MAX_BODY = 1 << 20;

const DIRECTIVE_BLOCK = /\[fake((?:\s+[A-Za-z_]+=[^\s\]]+)*)\s*\]/g;
const PAIR = /([A-Za-z_]+)=([^\s\]]+)/g;

function applyPairs(base, text) {
  const b = { ...base };
  for (const m of text.matchAll(PAIR)) {
    const [, key, value] = m;
    const num = Number(value);
    if (key === 'tokens' && Number.isInteger(num) && num >= 0) b.tokens = num;
    else if ((key === 'interval_ms' || key === 'ttft_ms') && Number.isFinite(num) && num >= 0) {
      b[key === 'interval_ms' ? 'interval' : 'ttft'] = num;
    } else throw new Error(`unsupported fake directive ${key}=${value}`);
  }
  return b;
}

const DEFAULT = applyPairs({ tokens: 5, interval: 0, ttft: 0 }, arg('--default', ''));

function behaviour(texts, header) {
  let b = DEFAULT;
  for (const text of texts) {
    for (const block of text.matchAll(DIRECTIVE_BLOCK)) b = applyPairs(b, block[1]);
  }
  return header ? applyPairs(b, header) : b;
}

const tokenText = (i) => `tok${i} `;

function textOf(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content.map((p) => (p && typeof p.text === 'string' ? p.text : '')).join(' ');
  }
  return '';
}

const words = (texts) => texts.reduce((n, t) => n + t.split(/\s+/).filter(Boolean).length, 0);

function sendJSON(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

function errorBody(status, message) {
  const type = status >= 500 ? 'server_error' : 'invalid_request_error';
  return { error: { message, type, param: null, code: null } };
}

let completions = 0;

function complete(req, res, raw) {
  let body;
  let texts;
  let b;
  try {
    body = JSON.parse(raw);
    if (!Array.isArray(body.messages)) throw new Error("'messages' is required");
    texts = body.messages.map((m) => textOf(m && m.content));
    b = behaviour(texts, req.headers['x-fake-control']);
  } catch (exc) {
    sendJSON(res, 400, errorBody(400, `Invalid request: ${exc.message}`));
    return;
  }
  const model = typeof body.model === 'string' ? body.model : 'gpt-4o-mini';
  const limit = body.max_completion_tokens || body.max_tokens;
  const tokens = Number.isInteger(limit) ? Math.min(b.tokens, limit) : b.tokens;
  const finish = tokens < b.tokens ? 'length' : 'stop';
  const prompt = words(texts);
  const usage = { prompt_tokens: prompt, completion_tokens: tokens, total_tokens: prompt + tokens };
  completions += 1;
  const cid = `chatcmpl-fake${completions}`;
  const created = Math.floor(Date.now() / 1000);

  if (!body.stream) {
    const send = () => {
      let text = '';
      for (let i = 0; i < tokens; i++) text += tokenText(i);
      sendJSON(res, 200, {
        id: cid,
        object: 'chat.completion',
        created,
        model,
        system_fingerprint: 'fp_fake',
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: text, refusal: null },
            logprobs: null,
            finish_reason: finish,
          },
        ],
        usage,
      });
    };
    if (b.ttft > 0) setTimeout(send, b.ttft);
    else send();
    return;
  }

  const includeUsage = Boolean(body.stream_options && body.stream_options.include_usage);
  // Every chunk is `head + delta + mid + finish_reason + tail`: built once per stream.
  const head =
    `data: {"id":"${cid}","object":"chat.completion.chunk","created":${created},` +
    `"model":${JSON.stringify(model)},"system_fingerprint":"fp_fake",` +
    '"choices":[{"index":0,"delta":';
  const mid = ',"logprobs":null,"finish_reason":';
  const tail = includeUsage ? '}],"usage":null}\n\n' : '}]}\n\n';
  const chunk = (delta, reason) => head + delta + mid + reason + tail;

  res.writeHead(200, {
    'Content-Type': 'text/event-stream; charset=utf-8',
    'x-request-id': cid,
  });
  res.write(chunk('{"role":"assistant","content":"","refusal":null}', 'null'));
  let closed = false;
  let timer = null;
  res.on('close', () => {
    closed = true;
    if (timer) clearTimeout(timer);
  });
  const start = performance.now() + b.ttft;
  let i = 0;

  const finishStream = () => {
    res.write(chunk('{}', JSON.stringify(finish)));
    if (includeUsage) {
      res.write(
        `data: {"id":"${cid}","object":"chat.completion.chunk","created":${created},` +
          `"model":${JSON.stringify(model)},"system_fingerprint":"fp_fake","choices":[],` +
          `"usage":${JSON.stringify(usage)}}\n\n`,
      );
    }
    res.write('data: [DONE]\n\n');
    res.end();
  };
  const emit = () => {
    timer = null;
    if (closed) return;
    const ok = res.write(chunk(`{"content":${JSON.stringify(tokenText(i))}}`, 'null'));
    i += 1;
    if (ok) next();
    else res.once('drain', next); // flow control: wait for a slow reader, as the fake does
  };
  const next = () => {
    if (closed) return;
    if (i >= tokens) {
      finishStream();
      return;
    }
    const delay = start + i * b.interval - performance.now(); // absolute deadline
    // Whole milliseconds: Node keeps one timer list per distinct duration.
    if (delay > 0) timer = setTimeout(emit, Math.ceil(delay));
    else if (i % 32 === 0) setImmediate(emit); // let I/O run when behind
    else emit();
  };
  next();
}

const server = http.createServer({ noDelay: true, keepAliveTimeout: 5000 }, (req, res) => {
  const path = req.url.split('?', 1)[0];
  if (req.method === 'GET' && path === '/healthz') {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 2 });
    res.end('ok');
    return;
  }
  if (req.method !== 'POST' || (path !== '/v1/chat/completions' && path !== '/chat/completions')) {
    req.resume();
    sendJSON(res, 404, errorBody(404, 'The model does not exist or you do not have access to it.'));
    return;
  }
  const parts = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) {
      sendJSON(res, 413, errorBody(413, 'Request body too large.'));
      req.destroy();
      return;
    }
    parts.push(c);
  });
  req.on('end', () => {
    if (size <= MAX_BODY) complete(req, res, Buffer.concat(parts).toString('utf8'));
  });
});
server.requestTimeout = 0; // streams are long; heads still have headersTimeout
server.maxConnections = 1000000;

const stop = () => {
  server.close();
  server.closeAllConnections();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

server.listen({ host: HOST, port: PORT, backlog: 4096 }, () => {
  process.stdout.write(`LISTENING http://${HOST}:${server.address().port}\n`);
});

// A fast local Gemini API for the proxy benchmark: Node's `http`, no packages.
//
// The Python fake of the tests (tests/upstreams/gemini_wire.py) is the reference for the wire
// format and the directive syntax; this one exists because a Python upstream sharing the load
// generator's core is itself the bottleneck at thousands of chunks per second (as for
// bench/peers/openai_upstream.js).
//
//   POST /{v1,v1beta,v1alpha}/models/{model}:streamGenerateContent?alt=sse
//                      200, text/event-stream, chunked: one GenerateContentResponse per content
//                      delta on absolute deadlines (no drift), each
//                      `data: {"candidates":[{"content":{"parts":[{"text":"tok0 "}],
//                      "role":"model"},"index":0}],"usageMetadata":{...running totals},
//                      "modelVersion":MODEL,"responseId":ID}\r\n\r\n`; the last candidate also
//                      has "finishReason" (STOP, or MAX_TOKENS when
//                      generationConfig.maxOutputTokens cut it). No [DONE]: the body ends.
//                      (Without alt=sse: 400, as the tests' fake: the JSON-array stream is not
//                      faked.)
//   POST /{version}/models/{model}:generateContent
//                      one GenerateContentResponse JSON object
//   GET /healthz       ok
//
// Behaviour per request from `[fake key=value ...]` blocks in the prompt's texts
// (systemInstruction and contents parts; sseserver puts the `q` of /v1/stream into the last
// user turn) or an `X-Fake-Control: key=value` header, over --default. Keys: tokens (default
// 5), interval_ms, ttft_ms; any other key is answered with 400 (the Python fake's failure
// modes are not reproduced here). Token i's text is exactly `tok${i} `
// (tests.upstreams.token_text). The key (x-goog-api-key) is not checked. Connections are kept
// alive.
//
//   node bench/peers/gemini_upstream.js --port 0    # prints "LISTENING http://127.0.0.1:PORT"
//   (sseserver: --gemini-base-url http://127.0.0.1:PORT/ and GEMINI_API_KEY set)
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
const SEP = '\r\n\r\n'; // Google's SSE events end with CRLF CRLF

const PATH = /^\/(v1|v1beta|v1alpha)\/models\/([^/:]+):(streamGenerateContent|generateContent)$/;
const DIRECTIVE_BLOCK = /\[fake((?:\s+[A-Za-z_]+=[^\s\]]+)*)\s*\]/g;
const PAIR = /([A-Za-z_]+)=([^\s\]]+)/g;

const STATUS_NAMES = {
  400: ['INVALID_ARGUMENT', 'Request contains an invalid argument.'],
  404: ['NOT_FOUND', 'models/unknown is not found for API version v1beta.'],
  413: ['INVALID_ARGUMENT', 'Request payload size exceeds the limit.'],
};

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

// Every text of the prompt: the system instruction's, then the turns' (gemini_wire._texts).
function textsOf(body) {
  const texts = [];
  const contents = [];
  const system = body.systemInstruction;
  if (system && typeof system === 'object' && !Array.isArray(system)) contents.push(system);
  if (body.contents !== undefined && !Array.isArray(body.contents)) {
    throw new Error("'contents' must be a list");
  }
  contents.push(...(body.contents || []));
  for (const content of contents) {
    for (const part of (content && content.parts) || []) {
      if (part && typeof part.text === 'string') texts.push(part.text);
    }
  }
  return texts;
}

const words = (texts) => texts.reduce((n, t) => n + t.split(/\s+/).filter(Boolean).length, 0);

function errorBody(status) {
  const [name, message] = STATUS_NAMES[status] || ['UNKNOWN', `Fake error ${status}.`];
  return { error: { code: status, message, status: name } };
}

function sendJSON(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

let responses = 0;

function generate(req, res, match, query, raw) {
  const streaming = match[3] === 'streamGenerateContent';
  if (streaming && !query.split('&').includes('alt=sse')) {
    sendJSON(res, 400, errorBody(400)); // the JSON-array stream is not faked
    return;
  }
  let body;
  let texts;
  let b;
  try {
    body = JSON.parse(raw);
    texts = textsOf(body);
    b = behaviour(texts, req.headers['x-fake-control']);
  } catch (exc) {
    const err = errorBody(400);
    err.error.message = `Invalid request: ${exc.message}`;
    sendJSON(res, 400, err);
    return;
  }
  const model = decodeURIComponent(match[2]);
  const limit = (body.generationConfig || {}).maxOutputTokens;
  const tokens = Number.isInteger(limit) ? Math.min(b.tokens, limit) : b.tokens;
  const finish = tokens < b.tokens ? 'MAX_TOKENS' : 'STOP';
  const prompt = words(texts);
  responses += 1;
  const rid = `fake-${responses}`;
  // One GenerateContentResponse, as the Python fake builds it (same key order, compact JSON).
  const tail =
    `"promptTokensDetails":[{"modality":"TEXT","tokenCount":${prompt}}]},` +
    `"modelVersion":${JSON.stringify(model)},"responseId":"${rid}"}`;
  const response = (text, n, reason) =>
    `{"candidates":[{"content":{"parts":[{"text":${JSON.stringify(text)}}],"role":"model"},` +
    `"index":0${reason ? `,"finishReason":"${reason}"` : ''}}],` +
    `"usageMetadata":{"promptTokenCount":${prompt},"candidatesTokenCount":${n},` +
    `"totalTokenCount":${prompt + n},${tail}`;

  if (!streaming) {
    const send = () => {
      let text = '';
      for (let i = 0; i < tokens; i++) text += tokenText(i);
      const out = response(text, tokens, finish);
      res.writeHead(200, {
        'Content-Type': 'application/json',
        'Content-Length': Buffer.byteLength(out),
      });
      res.end(out);
    };
    if (b.ttft > 0) setTimeout(send, b.ttft);
    else send();
    return;
  }

  res.writeHead(200, { 'Content-Type': 'text/event-stream; charset=utf-8' });
  let closed = false;
  let timer = null;
  res.on('close', () => {
    closed = true;
    if (timer) clearTimeout(timer);
  });
  const last = tokens - 1;
  const start = performance.now() + b.ttft;
  let i = 0;

  const emit = () => {
    timer = null;
    if (closed) return;
    const ok = res.write(
      `data: ${response(tokenText(i), i + 1, i === last ? finish : null)}${SEP}`,
    );
    i += 1;
    if (ok) next();
    else res.once('drain', next); // flow control: wait for a slow reader, as the fake does
  };
  const next = () => {
    if (closed) return;
    if (i >= tokens) {
      if (tokens === 0) res.write(`data: ${response('', 0, finish)}${SEP}`);
      res.end();
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
  const [path, query = ''] = req.url.split('?', 2);
  if (req.method === 'GET' && path === '/healthz') {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 2 });
    res.end('ok');
    return;
  }
  const match = req.method === 'POST' ? PATH.exec(path) : null;
  if (match === null) {
    req.resume();
    sendJSON(res, 404, errorBody(404));
    return;
  }
  const parts = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) {
      sendJSON(res, 413, errorBody(413));
      req.destroy();
      return;
    }
    parts.push(c);
  });
  req.on('end', () => {
    if (size <= MAX_BODY) generate(req, res, match, query, Buffer.concat(parts).toString('utf8'));
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

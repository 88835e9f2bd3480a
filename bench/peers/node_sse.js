// Peer: Node's own `http` module, no packages.
//
// Same endpoint semantics as sseserver for the benchmarks:
//   GET  /v1/stream?tokens&interval_ms&size&ttft_ms   synthetic answer, absolute deadlines
//   GET  /sub?topic=T                                 subscribe (in-memory fan-out)
//   POST /pub  (form: topic, data)                    publish; answers the event id
//   GET  /healthz
//
//   node bench/peers/node_sse.js --port 8003
'use strict';

const http = require('http');
const crypto = require('crypto');
const { performance } = require('perf_hooks');

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const HOST = arg('--host', '127.0.0.1');
const PORT = Number(arg('--port', '8003'));

const WORDS = ['stream', 'token', 'event', 'server', 'browser', 'answer', 'model', 'socket'];
const PING_MS = 15000;
const WRITE_BOUND = 256 * 1024; // bytes a subscriber may lag behind before it is dropped
const SSE_HEADERS = {
  'Content-Type': 'text/event-stream; charset=utf-8',
  'Cache-Control': 'no-cache, no-transform',
  'X-Accel-Buffering': 'no',
};

const streams = new Set(); // open event streams, pinged by one timer
const topics = new Map(); // topic -> Set of responses
let lastId = 0;

function tokenText(i, size) {
  const word = WORDS[i % WORDS.length] + ' ';
  return size ? word.repeat(Math.floor(size / word.length) + 1).slice(0, size) : word;
}

function sseEvent(data, id, name) {
  let out = '';
  if (id !== undefined) out += `id: ${id}\n`;
  if (name !== undefined) out += `event: ${name}\n`;
  for (const line of String(data).split(/\r\n|\r|\n/)) out += `data: ${line}\n`;
  return out + '\n';
}

function openStream(res) {
  res.writeHead(200, SSE_HEADERS);
  streams.add(res);
  res.on('close', () => streams.delete(res));
}

function stream(req, res, query) {
  const num = (name, dflt) => (query.get(name) ? Number(query.get(name)) : dflt);
  const tokens = Math.floor(num('tokens', 32));
  const interval = num('interval_ms', 30);
  const size = Math.floor(num('size', 0));
  const ttft = num('ttft_ms', 0);
  const gen = crypto.randomBytes(9).toString('base64url');
  openStream(res);
  let closed = false;
  let timer = null;
  res.on('close', () => {
    closed = true;
    if (timer) clearTimeout(timer);
  });
  const start = performance.now();
  let first = 0;
  let i = 0;
  res.write(sseEvent(JSON.stringify({ id: gen, provider: 'synthetic', model: 'synthetic-1' }), `${gen}:0`, 'start'));

  const emit = () => {
    timer = null;
    if (closed) return;
    if (!first) first = performance.now();
    const ok = res.write(sseEvent(JSON.stringify({ text: tokenText(i, size) }), `${gen}:${i + 1}`));
    i += 1;
    if (ok) next();
    else res.once('drain', next); // flow control: wait for a slow reader
  };
  const next = () => {
    if (closed) return;
    if (i >= tokens) {
      const end = performance.now();
      const metrics = {
        ttft_ms: Math.round(((first || end) - start) * 100) / 100,
        tokens,
        tokens_per_s: end > start ? Math.round((tokens / (end - start)) * 100000) / 100 : 0,
        duration_ms: Math.round((end - start) * 100) / 100,
      };
      res.write(sseEvent(JSON.stringify(metrics), `${gen}:${tokens + 1}`, 'metrics'));
      res.write(sseEvent('[DONE]', `${gen}:${tokens + 2}`));
      res.end();
      return;
    }
    const delay = start + ttft + i * interval - performance.now(); // absolute deadline
    if (delay > 0) timer = setTimeout(emit, delay);
    else if (i % 32 === 0) setImmediate(emit); // let I/O run when behind
    else emit();
  };
  next();
}

function subscribe(req, res, query) {
  const topic = query.get('topic');
  if (!topic) {
    res.writeHead(400, { 'Content-Type': 'text/plain' });
    res.end('topic is required');
    return;
  }
  let subscribers = topics.get(topic);
  if (!subscribers) topics.set(topic, (subscribers = new Set()));
  openStream(res);
  res.write('retry: 2000\n: subscribed\n\n');
  subscribers.add(res);
  res.on('close', () => subscribers.delete(res));
}

function publish(req, res) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const form = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
    const topic = form.get('topic');
    if (!topic) {
      res.writeHead(400, { 'Content-Type': 'text/plain' });
      res.end('topic is required');
      return;
    }
    lastId += 1;
    const encoded = sseEvent(form.getAll('data').join('\n'), String(lastId)); // encoded once
    const subscribers = topics.get(topic);
    if (subscribers) {
      for (const sub of subscribers) {
        if (sub.writableLength > WRITE_BOUND) {
          subscribers.delete(sub); // a slow subscriber: drop it, it may reconnect
          sub.destroy();
        } else {
          sub.write(encoded);
        }
      }
    }
    const body = String(lastId);
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
  });
}

const server = http.createServer({ noDelay: true, keepAliveTimeout: 5000 }, (req, res) => {
  const url = new URL(req.url, 'http://x');
  if (req.method === 'GET' && url.pathname === '/v1/stream') return stream(req, res, url.searchParams);
  if (req.method === 'GET' && url.pathname === '/sub') return subscribe(req, res, url.searchParams);
  if (req.method === 'POST' && url.pathname === '/pub') return publish(req, res);
  if (req.method === 'GET' && url.pathname === '/healthz') {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 2 });
    return res.end('ok');
  }
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end('not found');
});
server.requestTimeout = 0; // streams are long; heads still have headersTimeout
server.maxConnections = 1000000;

setInterval(() => {
  for (const res of streams) res.write(': ping\n\n');
}, PING_MS).unref();

process.on('SIGTERM', () => {
  server.close();
  for (const res of streams) res.destroy();
  process.exit(0);
});

server.listen({ host: HOST, port: PORT, backlog: 4096 });

#!/usr/bin/env node
// A real Vercel AI SDK client (the `ai` package, UI message stream protocol v1) for
// sseserver's POST /v1/chat, used by tests/integration/test_vercel_ai.py.
//
//   node ui_stream_client.mjs URL [BODY_JSON | -] [--mode=transport|chat]
//                             [--abort-after-first-delta] [--timeout-ms=N]
//                             [--header=NAME:VALUE ...]
//
// BODY_JSON (or stdin when absent or "-") is what useChat posts: {"id", "messages"
// (UIMessages), "trigger", ...extra}; the extra fields (provider, model, params) are sent
// as the request body options, exactly as `useChat({body})`/`sendMessage(m, {body})` do.
//
// Modes, both on the SDK's own code paths, nothing re-implemented here:
// - transport: DefaultChatTransport.sendMessages (fetch, SSE parsing, the strict zod
//   schema of every chunk) and readUIMessageStream (chunks -> UIMessage snapshots);
// - chat: AbstractChat (the engine behind useChat/Chat of @ai-sdk/react, vue, svelte)
//   with a plain ChatState: sendMessage(), status, error, onError, onFinish, stop().
//
// --header: a request header, set through the transport's `headers` option (as
// `useChat({transport: new DefaultChatTransport({headers})})` would), e.g. X-Request-ID.
//
// --abort-after-first-delta: transport mode aborts its AbortSignal, chat mode calls
// chat.stop() (the Stop button), as soon as the first text-delta chunk has been parsed.
//
// Output: JSON lines on stdout:
//   {"type":"http", status, headers}            the response head (via the fetch hook)
//   {"type":"chunk", chunk}                      every UIMessageChunk the SDK parsed
//   {"type":"message", n, text, parts}           every UIMessage snapshot (text grows)
//   {"type":"status", status}                    chat mode: status transitions
//   {"type":"abort", after_chunks, text}         the abort was triggered
//   {"type":"error", where, name, message}       an error the SDK reported
//   {"type":"finish", ...}                       chat mode: onFinish's flags
//   {"type":"final", ...}                        last line: the outcome
// and every line has "t", milliseconds since the process started.
// Exit 0 when the client ran to its end (whatever the server said), 2 on bad usage,
// 3 when --timeout-ms ran out.

import {
  AbstractChat,
  DefaultChatTransport,
  readUIMessageStream,
} from "ai";

const started = performance.now();

// Every line carries t: milliseconds since this process started, so the caller can tell a
// stream that arrived token by token from one that arrived at once.
function emit(obj) {
  process.stdout.write(JSON.stringify({ ...obj, t: elapsed() }) + "\n");
}

function elapsed() {
  return Math.round(performance.now() - started);
}

function usage(message) {
  process.stderr.write(`ui_stream_client: ${message}\n`);
  process.exit(2);
}

function errorInfo(error) {
  if (error instanceof Error) {
    return { name: error.name, message: error.message };
  }
  return { name: typeof error, message: String(error) };
}

function textOf(message) {
  if (!message) return "";
  return message.parts
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

// -- arguments ---------------------------------------------------------------------------

const positional = [];
const options = { mode: "transport", abortAfterFirstDelta: false, timeoutMs: 20000 };
const headers = {};
for (const arg of process.argv.slice(2)) {
  if (arg === "--abort-after-first-delta") options.abortAfterFirstDelta = true;
  else if (arg.startsWith("--mode=")) options.mode = arg.slice("--mode=".length);
  else if (arg.startsWith("--timeout-ms=")) options.timeoutMs = Number(arg.slice(13));
  else if (arg.startsWith("--header=")) {
    const [name, ...value] = arg.slice("--header=".length).split(":");
    if (!name || value.length === 0) usage(`bad header ${arg}`);
    headers[name.trim()] = value.join(":").trim();
  }
  else if (arg.startsWith("--")) usage(`unknown option ${arg}`);
  else positional.push(arg);
}
if (positional.length < 1 || positional.length > 2) usage("expected URL [BODY_JSON|-]");
if (!["transport", "chat"].includes(options.mode)) usage(`unknown mode ${options.mode}`);
if (!(options.timeoutMs > 0)) usage("--timeout-ms must be positive");

const [url, rawBody] = positional;
let requestBody;
try {
  requestBody = JSON.parse(rawBody === undefined || rawBody === "-" ? await readStdin() : rawBody);
} catch (error) {
  usage(`BODY_JSON is not JSON: ${error.message}`);
}
const { id: chatId = "chat", messages, trigger = "submit-message", messageId, ...extra } =
  requestBody;
if (!Array.isArray(messages) || messages.length === 0) usage("body.messages: a non-empty list");

// Every wait of this process is bounded: the caller gets a "final" line either way.
const deadline = setTimeout(() => {
  emit({ type: "final", mode: options.mode, timeout: true });
  process.exit(3);
}, options.timeoutMs);

// -- the transport, tapped (not replaced): the SDK parses, we only look ------------------

const seen = { chunks: 0, deltas: 0, finish: null, errorChunks: [], http: null };
let onFirstDelta = () => {};

// The fetch hook of HttpChatTransportInitOptions: records the response head.
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  seen.http = {
    status: response.status,
    headers: Object.fromEntries(
      [
        "content-type",
        "x-vercel-ai-ui-message-stream",
        "cache-control",
        "x-accel-buffering",
        "x-request-id",
      ]
        .filter((name) => response.headers.has(name))
        .map((name) => [name, response.headers.get(name)]),
    ),
  };
  emit({ type: "http", ...seen.http });
  return response;
}

class TappedTransport extends DefaultChatTransport {
  processResponseStream(stream) {
    return super.processResponseStream(stream).pipeThrough(
      new TransformStream({
        transform(chunk, controller) {
          seen.chunks += 1;
          emit({ type: "chunk", chunk });
          if (chunk.type === "finish") seen.finish = chunk;
          if (chunk.type === "error") seen.errorChunks.push(chunk.errorText);
          controller.enqueue(chunk);
          if (chunk.type === "text-delta" && ++seen.deltas === 1) onFirstDelta();
        },
      }),
    );
  }
}

const transport = new TappedTransport({ api: url, headers, fetch: recordingFetch });

// -- mode: transport -------------------------------------------------------------------

async function runTransport() {
  const abortController = new AbortController();
  let aborted = false;
  let snapshot;
  if (options.abortAfterFirstDelta) {
    onFirstDelta = () => {
      aborted = true;
      emit({ type: "abort", after_chunks: seen.chunks, text: textOf(snapshot) });
      abortController.abort();
    };
  }
  const errors = [];
  let n = 0;
  try {
    const chunks = await transport.sendMessages({
      chatId,
      messages,
      trigger,
      messageId,
      body: extra,
      abortSignal: abortController.signal,
    });
    const stream = readUIMessageStream({
      stream: chunks,
      onError(error) {
        errors.push({ where: "stream", ...errorInfo(error) });
        emit({ type: "error", where: "stream", ...errorInfo(error) });
      },
    });
    for await (const message of stream) {
      snapshot = message;
      n += 1;
      emit({ type: "message", n, text: textOf(message), parts: message.parts });
    }
  } catch (error) {
    errors.push({ where: "send", ...errorInfo(error) });
    emit({ type: "error", where: "send", ...errorInfo(error) });
  }
  return {
    message: snapshot ?? null,
    snapshots: n,
    aborted,
    error: errors[0] ?? null,
    errors,
  };
}

// -- mode: chat (useChat's engine) -------------------------------------------------------

class PlainChatState {
  constructor(initial) {
    this.status = "ready";
    this.error = undefined;
    this.messages = initial;
    this.snapshots = 0;
  }
  pushMessage = (message) => {
    this.messages = this.messages.concat(message);
    this.observe(message);
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
  };
  replaceMessage = (index, message) => {
    this.messages = [
      ...this.messages.slice(0, index),
      this.snapshot(message),
      ...this.messages.slice(index + 1),
    ];
    this.observe(message);
  };
  snapshot = (thing) => structuredClone(thing);
  observe(message) {
    if (message.role !== "assistant") return;
    this.snapshots += 1;
    emit({ type: "message", n: this.snapshots, text: textOf(message), parts: message.parts });
  }
}

class ObservedChat extends AbstractChat {
  setStatus({ status, error }) {
    if (status !== this.status || error !== undefined) {
      emit({ type: "status", status, ...(error ? { error: errorInfo(error) } : {}) });
    }
    super.setStatus({ status, error });
  }
}

async function runChat() {
  if (trigger !== "submit-message") usage("chat mode sends a new message: trigger submit-message");
  const last = messages[messages.length - 1];
  const state = new PlainChatState(structuredClone(messages.slice(0, -1)));
  const onErrorCalls = [];
  let finish = null;
  const chat = new ObservedChat({
    id: chatId,
    transport,
    state,
    onError(error) {
      onErrorCalls.push(errorInfo(error));
      emit({ type: "error", where: "chat.onError", ...errorInfo(error) });
    },
    onFinish({ message, isAbort, isDisconnect, isError, finishReason }) {
      finish = { isAbort, isDisconnect, isError, finishReason: finishReason ?? null };
      emit({ type: "finish", ...finish, text: textOf(message) });
    },
  });
  let stopped = null;
  let aborted = false;
  if (options.abortAfterFirstDelta) {
    onFirstDelta = () => {
      aborted = true;
      emit({ type: "abort", after_chunks: seen.chunks, text: textOf(chat.lastMessage) });
      stopped = chat.stop();
    };
  }
  let thrown = null;
  try {
    await chat.sendMessage(structuredClone(last), { body: extra });
    if (stopped) await stopped;
  } catch (error) {
    thrown = errorInfo(error);
    emit({ type: "error", where: "sendMessage", ...thrown });
  }
  const lastMessage = chat.lastMessage;
  const assistant = lastMessage && lastMessage.role === "assistant" ? lastMessage : null;
  const error = chat.error ? errorInfo(chat.error) : thrown;
  return {
    message: assistant,
    snapshots: state.snapshots,
    aborted,
    status: chat.status,
    error,
    errors: onErrorCalls,
    onFinish: finish,
    messages: chat.messages.length,
  };
}

// -- run -------------------------------------------------------------------------------

const outcome = options.mode === "chat" ? await runChat() : await runTransport();
clearTimeout(deadline);
emit({
  type: "final",
  mode: options.mode,
  timeout: false,
  http: seen.http,
  text: textOf(outcome.message),
  finish: seen.finish !== null,
  finishReason: seen.finish?.finishReason ?? null,
  errorChunks: seen.errorChunks,
  chunks: seen.chunks,
  deltas: seen.deltas,
  ...outcome,
});

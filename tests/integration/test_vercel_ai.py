"""The real Vercel AI SDK client against ``POST /v1/chat`` (SPEC §6: the UI message
stream protocol v1, "so ``useChat`` pages work unchanged").

``tests/node/ui_stream_client.mjs`` runs under Node.js with the ``ai`` npm package pinned
in ``tests/node/package.json`` (the AI SDK 5 line) and uses its own client machinery:
``DefaultChatTransport.sendMessages`` + ``readUIMessageStream`` ("transport" mode), and
``AbstractChat``, the engine of ``useChat`` ("chat" mode: ``sendMessage``, ``status``,
``error``, ``onFinish``, ``stop()``). Its JSON lines say what the SDK made of the stream.

A real sseserver process answers, with the synthetic provider (known text) and the
``openai`` provider pointed at a local OpenAI wire upstream (``tests.upstreams``) for
upstream failures and for watching the upstream socket when the browser aborts.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.logtail import LOG_WAIT_S, LogTail
from tests.support.procs import ROOT, server_process
from tests.support.requirements import require, require_binary
from tests.support.synthetic import expected_text
from tests.upstreams import RequestRecord
from tests.upstreams import token_text as upstream_token_text
from tests.upstreams.openai_wire import OpenAIWire

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NODE_DIR = ROOT / "tests" / "node"
CLIENT = NODE_DIR / "ui_stream_client.mjs"
CLIENT_TIMEOUT_MS = 15_000  # the client's own deadline: it then prints {"timeout": true}
CLIENT_KILL_S = 25  # and the process's, should the client not keep to its own
MODES = ("transport", "chat")


# -- Node.js and the pinned `ai` package ------------------------------------------------


def _installed_matches_pins() -> bool:
    """node_modules holds exactly the versions package.json pins (not a stale install)."""
    pins = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    for name, version in pins.items():
        manifest = NODE_DIR / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text())["version"] != version:
            return False
    return True


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` binary, with tests/node's locked packages installed by make."""
    node = require_binary("node")
    require_binary("npm")  # make installs the packages with it
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    require("Node.js >= 18", major >= 18, f"found {version}; the ai package needs 18+")
    # Installing is `make`'s job (`npm ci` next to `pip install`): tests talk to loopback only.
    require(
        "tests/node's npm packages",
        _installed_matches_pins(),
        f"the pinned packages are not installed: run `make test`, or `npm ci` in {NODE_DIR}",
    )
    return node


# -- the sseserver process and its access log ---------------------------------------------


class Upstream:
    """A local OpenAI wire upstream (tests.upstreams.OpenAIWire) on its own event loop in a
    thread, so synchronous tests can wait on its connection events."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.wire: OpenAIWire | None = None

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        wire = OpenAIWire()
        async with wire:
            self.wire = wire
            self._ready.set()
            await self._stop.wait()

    def start(self) -> Upstream:
        self._thread.start()
        assert self._ready.wait(10), "the OpenAI wire upstream did not start"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        stop = self._stop
        if stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)

    @property
    def base_url(self) -> str:
        assert self.wire is not None
        return self.wire.base_url

    def request_with(self, marker: str, within_s: float) -> RequestRecord:
        """The request whose body (the prompt) contains ``marker``."""
        wire = self.wire
        assert wire is not None

        def find() -> RequestRecord | None:
            return next((r for r in wire.requests if marker.encode() in r.body), None)

        async def wait() -> RequestRecord | None:
            await wire.wait_until(lambda: find() is not None, within_s)
            return find()

        found = asyncio.run_coroutine_threadsafe(wait(), self._loop).result(within_s + 5)
        assert found is not None, f"the upstream got no request with {marker!r}"
        return found

    def wait_closed(self, request: RequestRecord, within_s: float) -> bool:
        wire = self.wire
        assert wire is not None
        future = asyncio.run_coroutine_threadsafe(
            wire.wait_closed(request.connection, within_s), self._loop
        )
        return future.result(within_s + 5)


@dataclass
class Server:
    url: str  # of /v1/chat
    log: LogTail
    upstream: Upstream


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    upstream = Upstream().start()
    try:
        with server_process(
            "--log-format",
            "json",
            "--openai-base-url",
            upstream.base_url,
            "--upstream-timeout-s",
            "5",
            env={"OPENAI_API_KEY": "test-key"},
        ) as (proc, port):
            assert proc.stdout is not None
            log = LogTail(proc.stdout)
            yield Server(f"http://127.0.0.1:{port}/v1/chat", log, upstream)
            failures = [r for r in log.records if r.get("level") in ("error", "critical")]
            assert not failures, f"the server logged errors:\n{log.text()}"
    finally:
        upstream.stop()


# -- running the client ----------------------------------------------------------------


@dataclass
class ClientRun:
    lines: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["type"] == kind]

    @property
    def final(self) -> dict[str, Any]:
        finals = self.of("final")
        assert len(finals) == 1 and self.lines[-1] is finals[0], self.dump()
        return finals[0]

    @property
    def texts(self) -> list[str]:
        """The text of every UIMessage snapshot, in order."""
        return [m["text"] for m in self.of("message")]

    def dump(self) -> str:
        return "\n".join(json.dumps(line) for line in self.lines) + f"\nstderr:\n{self.stderr}"


def run_client(node: str, url: str, body: dict[str, Any], *flags: str) -> ClientRun:
    done = subprocess.run(
        [node, str(CLIENT), url, "-", f"--timeout-ms={CLIENT_TIMEOUT_MS}", *flags],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=CLIENT_KILL_S,
        cwd=NODE_DIR,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    run = ClientRun(lines, done.stderr)
    assert done.returncode == 0, f"client exit {done.returncode}:\n{run.dump()}"
    assert not run.final["timeout"], run.dump()
    return run


def use_chat_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    """What useChat's DefaultChatTransport posts (the client rebuilds it from these)."""
    return {
        "id": "chat-" + uuid.uuid4().hex[:8],
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        "trigger": "submit-message",
        **extra,
    }


def new_request_id() -> str:
    return "vercel-" + uuid.uuid4().hex[:12]


def assert_ui_stream_head(run: ClientRun) -> None:
    (http,) = run.of("http")
    assert http["status"] == 200, run.dump()
    assert http["headers"]["x-vercel-ai-ui-message-stream"] == "v1", http
    assert http["headers"]["content-type"].startswith("text/event-stream"), http


# -- (a) the answer, streamed, assembled by the SDK ------------------------------------------

TOKENS, INTERVAL_MS = 12, 25


@pytest.mark.parametrize("mode", MODES)
def test_real_client_assembles_the_streamed_answer(node: str, server: Server, mode: str) -> None:
    request_id = new_request_id()
    body = use_chat_body(
        provider="synthetic",
        model="synthetic-1",
        params={"tokens": TOKENS, "interval_ms": INTERVAL_MS},
    )
    run = run_client(
        node, server.url, body, f"--mode={mode}", f"--header=X-Request-ID:{request_id}"
    )
    final = run.final
    expected = expected_text(TOKENS)
    assert_ui_stream_head(run)

    # The SDK's own message: one step, one text part, done, with the exact text.
    message = final["message"]
    assert message["role"] == "assistant", run.dump()
    assert message["parts"] == [
        {"type": "step-start"},
        {"type": "text", "text": expected, "state": "done"},
    ], run.dump()
    assert final["text"] == expected
    (start,) = [c["chunk"] for c in run.of("chunk") if c["chunk"]["type"] == "start"]
    assert message["id"] == start["messageId"]

    # Streamed: one snapshot per token, each the previous text plus that token, spread out
    # over the stream's duration (a buffered answer would arrive as one late blob).
    grown = [t for i, t in enumerate(run.texts) if t and (i == 0 or t != run.texts[i - 1])]
    assert grown == [expected_text(k) for k in range(1, TOKENS + 1)], run.dump()
    with_text = [m for m in run.of("message") if m["text"]]
    spread_ms = with_text[-1]["t"] - with_text[0]["t"]
    assert spread_ms >= (TOKENS - 1) * INTERVAL_MS * 0.5, (spread_ms, run.dump())

    # Finished, no error.
    assert final["finish"] is True and final["finishReason"] == "stop", run.dump()
    assert final["error"] is None and final["errors"] == [] and final["errorChunks"] == []
    if mode == "chat":
        assert final["status"] == "ready"
        assert final["onFinish"] == {
            "isAbort": False,
            "isDisconnect": False,
            "isError": False,
            "finishReason": "stop",
        }
        assert [s["status"] for s in run.of("status")] == ["submitted", "streaming", "ready"]

    record = server.log.access(request_id)
    assert (record["status"], record["reason"]) == (200, "complete"), record


def test_real_use_chat_with_nothing_of_ours(node: str, server: Server) -> None:
    """A useChat body with no provider, model or params: the default synthetic answer."""
    run = run_client(node, server.url, use_chat_body(), "--mode=chat")
    final = run.final
    assert_ui_stream_head(run)
    assert final["text"] == expected_text(32), run.dump()
    assert final["status"] == "ready" and final["finishReason"] == "stop", run.dump()
    assert final["messages"] == 2  # the user's message and the answer


# -- (b) errors surface as the client's error --------------------------------------------


@dataclass(frozen=True)
class ErrorCase:
    body: dict[str, Any]
    status: int  # of the response head
    says: str  # in the error message the SDK reports
    text: str  # what the assistant message holds when the error arrives


ERROR_CASES = {
    "unknown-provider": ErrorCase(
        use_chat_body(provider="no-such-provider"), 400, "provider: unknown or not configured", ""
    ),
    "bad-params": ErrorCase(use_chat_body(params={"tokens": -1}), 400, "tokens must be", ""),
    "upstream-500": ErrorCase(
        use_chat_body("hi [fake fail=500]", provider="openai"), 502, "upstream_500", ""
    ),
    "upstream-drops-mid-stream": ErrorCase(
        use_chat_body("hi [fake tokens=6 interval_ms=5 fail=drop after=3]", provider="openai"),
        200,
        "upstream",
        "".join(upstream_token_text(i) for i in range(3)),
    ),
    "upstream-error-event": ErrorCase(
        use_chat_body("hi [fake tokens=6 fail=error_event after=2]", provider="openai"),
        200,
        "upstream",
        "".join(upstream_token_text(i) for i in range(2)),
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
@pytest.mark.parametrize("mode", MODES)
def test_errors_reach_the_real_client(
    node: str, server: Server, mode: str, case: ErrorCase
) -> None:
    run = run_client(node, server.url, case.body, f"--mode={mode}")
    final = run.final
    assert final["http"]["status"] == case.status, run.dump()
    error = final["error"]
    assert error is not None, run.dump()
    assert case.says in error["message"], run.dump()
    assert final["finish"] is False, run.dump()
    assert final["text"] == case.text, run.dump()
    if case.status == 200:
        # In-stream: the server's `error` chunk, parsed by the SDK's schema, is the error
        # the client reports, after the text that came before it.
        assert final["errorChunks"] == [error["message"]], run.dump()
        assert final["message"]["parts"][-1]["text"] == case.text, run.dump()
    else:
        # Before the stream: an HTTP error whose JSON body is the SDK's error message.
        assert final["message"] is None and final["chunks"] == 0, run.dump()
        assert json.loads(error["message"])["error"]["message"], run.dump()
    if mode == "chat":
        assert final["status"] == "error", run.dump()
        assert final["errors"] == [{"name": "Error", "message": error["message"]}], run.dump()
        assert final["onFinish"] is not None and final["onFinish"]["isError"] is True
        assert final["onFinish"]["isAbort"] is False, run.dump()
    else:
        assert final["errors"][0]["where"] == ("stream" if case.status == 200 else "send")


# -- (c) the client aborts mid-stream: the server ends the generation ----------------------

# 200 tokens 50 ms apart: ~10 s, far longer than any wait below, so an end seen on the
# server within those waits can only be the abort's doing.
LONG = {"tokens": 200, "interval_ms": 50}
LONG_S = 10.0


def assert_client_aborted(run: ClientRun, mode: str, full_text: str) -> None:
    final = run.final
    (abort,) = run.of("abort")
    assert final["aborted"] is True, run.dump()
    assert final["finish"] is False and final["deltas"] >= 1, run.dump()
    # The client kept what it had: a non-empty prefix of the answer, and stopped there.
    assert final["text"] and full_text.startswith(final["text"]), run.dump()
    assert final["deltas"] < 5, run.dump()  # of 200, 50 ms apart: it stopped reading
    assert final["t"] - abort["t"] < 2000, run.dump()
    if mode == "chat":
        # chat.stop(): useChat's Stop button. Not an error; onFinish says aborted.
        assert final["status"] == "ready" and final["error"] is None, run.dump()
        assert final["onFinish"]["isAbort"] is True, run.dump()
        assert final["onFinish"]["isError"] is False, run.dump()
    else:
        # An AbortSignal on sendMessages: readUIMessageStream reports the AbortError.
        assert final["error"] is not None and final["error"]["name"] == "AbortError"


@pytest.mark.parametrize("mode", MODES)
def test_client_abort_ends_the_generation(node: str, server: Server, mode: str) -> None:
    request_id = new_request_id()
    body = use_chat_body(params=LONG)
    run = run_client(
        node,
        server.url,
        body,
        f"--mode={mode}",
        "--abort-after-first-delta",
        f"--header=X-Request-ID:{request_id}",
    )
    assert_ui_stream_head(run)
    assert_client_aborted(run, mode, expected_text(LONG["tokens"]))

    # The server saw the client go and ended the response (the access log line is written
    # when the handler, and with it the provider's iterator, has finished).
    record = server.log.access(request_id)
    assert record["status"] == 200 and record["reason"] == "client_disconnect", record
    assert record["duration_ms"] < LONG_S * 1000 / 3, record


@pytest.mark.parametrize("mode", MODES)
def test_client_abort_closes_the_upstream_call(node: str, server: Server, mode: str) -> None:
    """Through the openai provider: the upstream connection is closed by sseserver, so no
    token is paid for after the browser's Stop (SPEC §7)."""
    request_id, marker = new_request_id(), uuid.uuid4().hex
    body = use_chat_body(f"{marker} [fake tokens=200 interval_ms=50]", provider="openai")
    run = run_client(
        node,
        server.url,
        body,
        f"--mode={mode}",
        "--abort-after-first-delta",
        f"--header=X-Request-ID:{request_id}",
    )
    assert_ui_stream_head(run)
    assert_client_aborted(run, mode, "".join(upstream_token_text(i) for i in range(200)))

    record = server.log.access(request_id)
    assert record["reason"] == "client_disconnect", record
    request = server.upstream.request_with(marker, within_s=1.0)
    assert server.upstream.wait_closed(request, within_s=LOG_WAIT_S), (
        f"the upstream connection is still open {LOG_WAIT_S} s after the access log line"
    )
    assert request.connection.closed_by == "peer", request.connection
    assert request.connection.chunks_written < 200, request.connection

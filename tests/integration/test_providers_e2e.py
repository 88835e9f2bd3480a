"""The LLM providers end to end: a client, a real sseserver process (and a real nginx), the
official SDKs inside it, and fake upstreams in processes of their own that speak the real
OpenAI / Gemini streaming wire formats (SPEC §6, §7).

Everything is measured where it matters:
- what the upstream received (model, system, temperature, max tokens), from the fake's
  own record of the request body;
- what the client received, byte for byte (raw sockets, h11 as the framing oracle, the
  chunked terminator checked);
- cancellation at the upstream's socket: the fake records when the connection that
  carried the generation was closed, in ``time.monotonic()``, which is one clock for every
  process of the machine, so the test compares it with the moment it acted itself.

Each request carries a nonce in its prompt, so its upstream request (and connection) is
found among everything the shared fakes have seen.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from sseserver.config import UPSTREAM_CLIENTS, Config
from tests.support.chunks import split_chunks
from tests.support.nginx import Nginx, deploy_config, nginx_running
from tests.support.rawhttp import RawClient, SSEReader, open_stream, seq_of, text_of
from tests.support.redis_server import ServerProcess, sseserver_running
from tests.support.sse_parser import Event
from tests.support.upstream_procs import UpstreamProcess, start_upstream
from tests.upstreams import expected_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PROVIDERS = ("openai", "gemini")
# --openai-client: every server test runs once per client of the openai provider.
OPENAI_CLIENTS = UPSTREAM_CLIENTS["openai"]
GEMINI_CLIENT = Config().gemini_client  # the server's default: gemini runs on it
# Every client retries before the first byte (SPEC §7: at most 2 retries, for the statuses
# the SDKs retry); the SDKs also retry a wait for the answer's head that timed out.
RETRIES = 2
UPSTREAM_TIMEOUT_S = 2.0
CANCEL_BUDGET_S = 0.100  # SPEC §7: upstream connection closed within 100 ms
LONG = "[fake tokens=100000 interval_ms=10]"  # ~17 minutes: only a cancel ends it
DONE = "[DONE]"


# -- processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, UpstreamProcess]]:
    started: dict[str, UpstreamProcess] = {}
    try:
        for api in PROVIDERS:
            started[api] = start_upstream(api)
        yield started
    finally:
        for up in started.values():
            up.stop()


def _server_args(openai_url: str, gemini_url: str, openai_client: str) -> tuple[str, ...]:
    return (
        "--openai-base-url", openai_url,
        "--openai-client", openai_client,
        "--gemini-base-url", gemini_url,
        "--upstream-timeout-s", str(UPSTREAM_TIMEOUT_S),
        # The default already, said explicitly: with a grace period a generation whose
        # client left is held for a reconnect, and its upstream call would (rightly) stay
        # open; the disconnect tests measure the close that follows "nobody reads".
        "--resume-grace-s", "0",
    )  # fmt: skip


@pytest.fixture(scope="module", params=OPENAI_CLIENTS)
def openai_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(
    upstreams: dict[str, UpstreamProcess],
    tmp_path_factory: pytest.TempPathFactory,
    openai_client: str,
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("sseserver")
    args = _server_args(upstreams["openai"].base_url, upstreams["gemini"].base_url, openai_client)
    with sseserver_running(folder, *args, name="e2e") as proc:
        yield proc


@pytest.fixture(scope="module")
def unreachable_server(
    tmp_path_factory: pytest.TempPathFactory, openai_client: str
) -> Iterator[ServerProcess]:
    """A sseserver whose providers point at loopback ports where nothing listens."""
    folder = tmp_path_factory.mktemp("unreachable")
    with closed_port() as openai_port, closed_port() as gemini_port:
        args = _server_args(
            f"http://127.0.0.1:{openai_port}/v1", f"http://127.0.0.1:{gemini_port}/", openai_client
        )
        with sseserver_running(folder, *args, name="unreachable") as proc:
            yield proc


@pytest.fixture(scope="module")
def nginx(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """The shipped deploy/nginx.conf in front of ``server`` (skips outside CI without
    nginx, through ``require_binary``)."""
    prefix = tmp_path_factory.mktemp("nginx")
    logs = prefix / "logs"
    with nginx_running(prefix, lambda port: deploy_config(port, server.port, logs)) as nx:
        yield nx


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound and held, never listened on, so
    no other process (another test's server) can take it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something listens on {port}"
        yield port


# -- the fakes' records --------------------------------------------------------------------


async def fake_stats(up: UpstreamProcess, client: httpx.AsyncClient | None = None) -> Any:
    if client is None:
        async with httpx.AsyncClient(timeout=5.0) as own:
            return (await own.get(f"{up.url}/_fake/stats")).json()
    return (await client.get(f"{up.url}/_fake/stats")).json()


async def poll_stats(
    up: UpstreamProcess, predicate: Callable[[Any], bool], within: float, what: str
) -> Any:
    """The fake's stats once ``predicate`` holds. Polling is the only way to observe
    another process here; bounded by ``within`` seconds."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            stats = await fake_stats(up, client)
            if predicate(stats):
                return stats
            if time.monotonic() >= deadline:
                raise AssertionError(f"{up.api} upstream: {what} not within {within}s: {stats}")
            await asyncio.sleep(0.005)


def requests_of(stats: Any, nonce: str) -> list[dict[str, Any]]:
    """The upstream requests whose body carries ``nonce`` (a retried call has several)."""
    found = [r for r in stats["requests"] if nonce in r["body"]]
    assert len(found) <= 1 + RETRIES, found
    return found


def request_of(stats: Any, nonce: str) -> dict[str, Any] | None:
    """The last upstream request whose body carries ``nonce``."""
    found = requests_of(stats, nonce)
    return found[-1] if found else None


def client_of(provider: str, openai_client: str) -> str:
    return openai_client if provider == "openai" else GEMINI_CLIENT


def connection_of(stats: Any, request: dict[str, Any]) -> dict[str, Any]:
    (conn,) = [c for c in stats["connections"] if c["id"] == request["connection"]]
    return dict(conn)


# -- the client side -----------------------------------------------------------------------


def new_nonce() -> str:
    return "n" + secrets.token_hex(6)


def stream_body(provider: str, prompt: str, *, model: str | None = None, **params: Any) -> bytes:
    return json.dumps(
        {
            "provider": provider,
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "params": params,
        }
    ).encode()


async def post_stream(port: int, body: bytes) -> tuple[RawClient, SSEReader]:
    client, resp, reader = await open_stream(
        port,
        "/v1/stream",
        method="POST",
        headers=[("Content-Type", "application/json")],
        body=body,
    )
    assert resp.status == 200, resp
    assert (resp.header("content-type") or "").startswith("text/event-stream")
    return client, reader


def assert_clean_end(client: RawClient, reader: SSEReader) -> None:
    """The body ended with the chunked terminator, and nothing came after it."""
    assert reader.ended
    raw = bytes(client.raw)
    head_end = raw.index(b"\r\n\r\n") + 4
    _sizes, payload, after = split_chunks(raw[head_end:])
    assert after == b"", after
    assert payload == bytes(reader.data)
    assert raw.endswith(b"\r\n0\r\n\r\n")


def assert_ids(events: list[Event]) -> str:
    """Every event carries ``{gen}:{seq}`` of the start's generation, seqs 0, 1, 2, ..."""
    gen = json.loads(events[0].data)["id"]
    assert [e.last_event_id.rpartition(":")[0] for e in events] == [gen] * len(events)
    assert [seq_of(e) for e in events] == list(range(len(events)))
    return str(gen)


def split_stream(events: list[Event]) -> tuple[Event, list[Event], list[Event]]:
    """(start, message events, the rest) of a complete stream."""
    assert events and events[0].type == "start", events[:1]
    n = 1
    while n < len(events) and events[n].type == "message" and events[n].data != DONE:
        n += 1
    return events[0], events[1:n], events[n:]


async def healthz(port: int) -> int:
    async with httpx.AsyncClient(timeout=5.0) as client:
        return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code


# -- 1. the happy path -------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_through_server_matches_upstream(
    provider: str, server: ServerProcess, upstreams: dict[str, UpstreamProcess]
) -> None:
    nonce, n = new_nonce(), 7
    body = stream_body(
        provider,
        f"hello {nonce} [fake tokens={n} interval_ms=2]",
        model="e2e-model",
        system="Be brief.",
        temperature=0.25,
        max_tokens=50,
    )
    client, reader = await post_stream(server.port, body)
    async with client:
        events = await reader.rest(within=10)
    assert_clean_end(client, reader)

    gen = assert_ids(events)
    start, messages, rest = split_stream(events)
    assert json.loads(start.data) == {"id": gen, "provider": provider, "model": "e2e-model"}
    assert text_of(messages) == expected_text(n)
    assert [json.loads(m.data) for m in messages] == [{"text": f"tok{i} "} for i in range(n)]
    assert [e.type for e in rest] == ["metrics", "message"]
    assert rest[-1].data == DONE
    metrics = json.loads(rest[0].data)
    assert metrics["tokens"] == n
    assert isinstance(metrics["ttft_ms"], int | float) and metrics["ttft_ms"] > 0
    assert metrics["duration_ms"] >= metrics["ttft_ms"]

    # What the SDK inside sseserver sent, as the upstream received it.
    stats = await fake_stats(upstreams[provider])
    req = request_of(stats, nonce)
    assert req is not None
    sent = json.loads(req["body"])
    if provider == "openai":
        assert req["target"] == "/v1/chat/completions"
        assert sent["model"] == "e2e-model"
        assert sent["stream"] is True
        assert sent["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"hello {nonce} [fake tokens={n} interval_ms=2]"},
        ]
        assert (sent["temperature"], sent["max_tokens"]) == (0.25, 50)
    else:
        # The API version in the path is the SDK's choice (v1 or v1beta).
        assert re.fullmatch(
            r"/v1(beta)?/models/e2e-model:streamGenerateContent\?alt=sse", req["target"]
        ), req["target"]
        assert sent["systemInstruction"]["parts"] == [{"text": "Be brief."}]
        assert sent["contents"] == [
            {"role": "user", "parts": [{"text": f"hello {nonce} [fake tokens={n} interval_ms=2]"}]}
        ]
        assert sent["generationConfig"] == {"temperature": 0.25, "maxOutputTokens": 50}


# -- 2. every upstream failure of SPEC §7 ------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    name: str
    directive: str
    code: str | dict[str, str]  # per provider when the two APIs say it differently
    retryable: bool
    retry_after_s: float | None = None
    before: int = 0  # tokens streamed before the failure
    # The upstream connection must end up closed: an answer abandoned before its end
    # cannot carry another request, so it must not go back to the pool either.
    closes: bool = False
    # A status the SDKs retry (408, 409, 429, 5xx): every client asks again, twice.
    retried: bool = False
    # A failure only the SDKs retry (a wait for the answer's head that timed out).
    sdk_retried: bool = False

    def code_for(self, provider: str) -> str:
        return self.code if isinstance(self.code, str) else self.code[provider]


FAILURES = [
    Failure("401", "fail=401", "upstream_401", retryable=False),
    # OpenAI says the wait in Retry-After (the fake sends 1 by default), Gemini in a
    # google.rpc.RetryInfo detail ("1s"); both surface as retry_after_s.
    Failure("429", "fail=429", "rate_limited", retryable=True, retry_after_s=1.0, retried=True),
    Failure("429-retry-after", "fail=429 retry_after=0.3", "rate_limited", True, 0.3, retried=True),
    Failure("500", "fail=500", "upstream_500", retryable=True, retried=True),
    Failure("503", "fail=503", "upstream_503", retryable=True, retried=True),
    Failure("hang", "fail=hang", "upstream_timeout", True, closes=True, sdk_retried=True),
    Failure("stall", "fail=stall after=2", "upstream_timeout", True, before=2, closes=True),
    Failure("drop", "fail=drop after=2", "upstream_connection_error", True, before=2, closes=True),
    Failure("drop-at-once", "fail=drop after=0", "upstream_connection_error", True, closes=True),
    Failure(
        "malformed",
        "fail=malformed after=1",
        "upstream_protocol_error",
        False,
        before=1,
        closes=True,
    ),
    Failure("shape", "fail=shape after=1", "upstream_protocol_error", False, before=1, closes=True),
    # An in-stream {"error": ...} event: the Gemini SDK reads it as an HTTP 500 APIError.
    Failure(
        "error-event",
        "fail=error_event after=1",
        {"openai": "upstream_error", "gemini": "upstream_500"},
        retryable=True,
        before=1,
        closes=True,
    ),
]


def assert_one_error_then_end(
    events: list[Event], *, code: str, retryable: bool, retry_after_s: float | None, before: int
) -> dict[str, Any]:
    """start, ``before`` tokens, exactly one error, metrics, [DONE]; ids consecutive."""
    assert_ids(events)
    _start, messages, rest = split_stream(events)
    assert text_of(messages) == expected_text(before)
    assert [e.type for e in rest] == ["error", "metrics", "message"], rest
    assert rest[-1].data == DONE
    error = json.loads(rest[0].data)
    assert error["code"] == code, error
    assert error["retryable"] is retryable, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "sk-" not in error["message"]  # the upstream's words (keys) stay out
    assert error.get("retry_after_s") == retry_after_s, error
    assert set(error) <= {"code", "message", "retryable", "retry_after_s"}, error
    metrics = json.loads(rest[1].data)
    assert metrics["tokens"] == before
    return dict(error)


@pytest.mark.parametrize("failure", FAILURES, ids=[f.name for f in FAILURES])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_upstream_failure_is_one_error_event_and_a_clean_end(
    provider: str,
    failure: Failure,
    server: ServerProcess,
    upstreams: dict[str, UpstreamProcess],
    openai_client: str,
) -> None:
    up = upstreams[provider]
    nonce = new_nonce()
    sdk = client_of(provider, openai_client) == "sdk"
    retries = RETRIES if failure.retried or (failure.sdk_retried and sdk) else 0
    # How many times the upstream timeout is waited out (a hang retried by the SDK: thrice).
    timeouts = 1 + retries if failure.name == "hang" else 1
    # What the retries wait: the Retry-After header when the upstream sends one (the
    # OpenAI fake always does on 429; the Gemini fake only when told a delay, else it
    # says it in the error body, which the client does not read), else the backoff
    # (0.5 s, then 1 s, less jitter).
    told = provider == "openai" or "retry_after=" in failure.directive
    header_wait = failure.retry_after_s if told else None
    waits = retries * (header_wait or 0) or (1.5 if retries else 0.0)
    t0 = time.monotonic()
    client, reader = await post_stream(
        server.port, stream_body(provider, f"{nonce} [fake tokens=5 {failure.directive}]")
    )
    async with client:
        events = await reader.rest(within=timeouts * UPSTREAM_TIMEOUT_S + 5 + waits)
    took = time.monotonic() - t0
    assert_clean_end(client, reader)
    assert_one_error_then_end(
        events,
        code=failure.code_for(provider),
        retryable=failure.retryable,
        retry_after_s=failure.retry_after_s,
        before=failure.before,
    )
    if failure.name in ("hang", "stall"):
        # The upstream timeout bounds each wait for bytes, and nothing more.
        wait = timeouts * UPSTREAM_TIMEOUT_S
        assert wait * 0.9 < took < wait + waits + 2, took
    else:
        assert took < UPSTREAM_TIMEOUT_S + waits, took
    if retries and header_wait:
        assert took >= waits * 0.9, took  # Retry-After was honoured
    assert await healthz(server.port) == 200

    # Nothing hangs upstream: the fake is no longer answering this request, and the
    # connection is closed, or idle in sseserver's pool (a fully read error answer).
    def settled(stats: Any) -> bool:
        req = request_of(stats, nonce)
        if req is None or req["answering"]:
            return False
        return not failure.closes or connection_of(stats, req)["closed_at"] is not None

    stats = await poll_stats(up, settled, 2.0, f"request {nonce} settled")
    req = request_of(stats, nonce)
    assert req is not None
    assert len(requests_of(stats, nonce)) == 1 + retries
    conn = connection_of(stats, req)
    if failure.name in ("hang", "stall"):
        assert conn["closed_by"] == "peer", conn  # sseserver gave up and closed it


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_upstream_unreachable_is_one_error_event(
    provider: str, unreachable_server: ServerProcess
) -> None:
    client, reader = await post_stream(
        unreachable_server.port, stream_body(provider, "[fake tokens=5] anyone there?")
    )
    async with client:
        events = await reader.rest(within=UPSTREAM_TIMEOUT_S + 5)
    assert_clean_end(client, reader)
    assert_one_error_then_end(
        events, code="upstream_connection_error", retryable=True, retry_after_s=None, before=0
    )
    assert await healthz(unreachable_server.port) == 200


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_no_upstream_call_left_in_flight_after_failures(
    provider: str, server: ServerProcess, upstreams: dict[str, UpstreamProcess]
) -> None:
    """After the failures above (which run first, in file order): no request is still
    being answered and no connection is open except the one idle keep-alive connection
    that sseserver's pool may hold after fully read (error) answers. Every connection
    that is open belongs to the pool: none carries a request still in flight."""
    stats = await poll_stats(
        upstreams[provider],
        lambda s: s["answering"] == 0 and s["open"] <= 1,
        2.0,
        "no request in flight, at most one idle pooled connection",
    )
    open_ids = {c["id"] for c in stats["connections"] if c["closed_at"] is None}
    print(f"\n[after failures] {provider}: {len(open_ids)} idle pooled connection(s) open")
    # An open connection's last request got a complete answer (success or error status),
    # never one of the failures that abandon an answer mid-way.
    abandoning = {f.directive.split()[0] for f in FAILURES if f.closes}
    for conn_id in open_ids:
        last = [r for r in stats["requests"] if r["connection"] == conn_id][-1]
        assert not last["answering"], last
        assert not any(d in last["body"] for d in abandoning), last


# -- 3. cancellation, measured at the upstream's socket ------------------------------------


@dataclass
class Running:
    """A long generation that has streamed a few tokens to its client."""

    client: RawClient
    reader: SSEReader
    gen: str
    nonce: str
    conn_id: int
    measured: list[float] = field(default_factory=list)


async def start_long_generation(
    port: int, provider: str, up: UpstreamProcess, tokens_first: int = 3
) -> Running:
    nonce = new_nonce()
    client, reader = await post_stream(port, stream_body(provider, f"{nonce} {LONG}"))
    start = await reader.next(within=5)
    assert start.type == "start", start
    gen = json.loads(start.data)["id"]
    await reader.until(
        lambda r: sum(1 for _, e in r.arrivals if e.type == "message") >= tokens_first, within=5
    )
    stats = await fake_stats(up)
    req = request_of(stats, nonce)
    assert req is not None and req["answering"], req
    conn = connection_of(stats, req)
    assert conn["closed_at"] is None, conn
    return Running(client, reader, str(gen), nonce, int(conn["id"]))


async def upstream_close_latency(
    up: UpstreamProcess, run: Running, t0: float, how: str
) -> tuple[float, dict[str, Any]]:
    """Seconds from ``t0`` until the fake saw the generation's connection closed."""

    def closed(stats: Any) -> bool:
        (conn,) = [c for c in stats["connections"] if c["id"] == run.conn_id]
        return conn["closed_at"] is not None

    stats = await poll_stats(up, closed, 2.0, f"connection {run.conn_id} closed after {how}")
    (conn,) = [c for c in stats["connections"] if c["id"] == run.conn_id]
    latency = float(conn["closed_at"]) - t0
    print(f"\n[cancel latency] {up.api:6} {how:24} {latency * 1000:7.2f} ms")
    assert conn["closed_by"] == "peer", conn  # sseserver closed it, not the fake
    # The upstream stopped producing: nothing more is written on it.
    written = conn["chunks_written"]
    later = await fake_stats(up)
    (again,) = [c for c in later["connections"] if c["id"] == run.conn_id]
    assert again["chunks_written"] == written < 1000
    req = request_of(later, run.nonce)
    assert req is not None and not req["answering"]
    return latency, conn


async def assert_generation_ended(port: int, gen: str, code: str) -> None:
    """Joined directly on sseserver, the generation's replay ends with error ``code``."""
    client, resp, reader = await open_stream(port, f"/v1/streams/{gen}")
    async with client:
        assert resp.status == 200
        events = await reader.rest(within=5)
    assert [e.type for e in events[-3:]] == ["error", "metrics", "message"], events[-3:]
    assert json.loads(events[-3].data)["code"] == code
    assert events[-1].data == DONE


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_client_disconnect_closes_upstream_within_100ms(
    provider: str, server: ServerProcess, upstreams: dict[str, UpstreamProcess]
) -> None:
    up = upstreams[provider]
    run = await start_long_generation(server.port, provider, up)
    t0 = time.monotonic()
    await run.client.close()  # FIN straight to sseserver
    latency, _ = await upstream_close_latency(up, run, t0, "client disconnect")
    assert latency < CANCEL_BUDGET_S, f"{latency * 1000:.1f} ms"
    await assert_generation_ended(server.port, run.gen, "abandoned")
    assert await healthz(server.port) == 200


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_client_disconnect_through_nginx_closes_upstream_within_100ms(
    provider: str,
    server: ServerProcess,
    nginx: Nginx,
    upstreams: dict[str, UpstreamProcess],
) -> None:
    up = upstreams[provider]
    run = await start_long_generation(nginx.port, provider, up)
    t0 = time.monotonic()
    await run.client.close()  # FIN to nginx; nginx closes its connection to sseserver
    latency, _ = await upstream_close_latency(up, run, t0, "disconnect through nginx")
    assert latency < CANCEL_BUDGET_S, f"{latency * 1000:.1f} ms\nnginx: {nginx.log()}"
    await assert_generation_ended(server.port, run.gen, "abandoned")


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_cancel_endpoint_closes_upstream_within_100ms(
    provider: str, server: ServerProcess, upstreams: dict[str, UpstreamProcess]
) -> None:
    up = upstreams[provider]
    run = await start_long_generation(server.port, provider, up)
    async with httpx.AsyncClient(timeout=5.0) as http:
        # Connect first, so the measured time is the request's, not the handshake's.
        await http.get(f"http://127.0.0.1:{server.port}/healthz")
        t0 = time.monotonic()
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/streams/{run.gen}/cancel")
    assert resp.status_code == 200
    assert resp.json() == {"id": run.gen, "cancelled": True}
    latency, conn = await upstream_close_latency(up, run, t0, "POST .../cancel")
    assert latency < CANCEL_BUDGET_S, f"{latency * 1000:.1f} ms"

    # The client's stream ends cleanly: the tokens so far, error "cancelled", metrics, [DONE].
    async with run.client:
        await run.reader.rest(within=5)
    assert_clean_end(run.client, run.reader)
    events = [e for _, e in run.reader.arrivals]
    assert_ids(events)
    _start, messages, rest = split_stream(events)
    assert text_of(messages) == expected_text(len(messages))
    assert [e.type for e in rest] == ["error", "metrics", "message"], rest
    error = json.loads(rest[0].data)
    assert (error["code"], error["retryable"]) == ("cancelled", False)
    assert rest[-1].data == DONE
    # Every token the upstream wrote before the close reached sseserver or was in flight;
    # none was produced after it.
    assert len(messages) <= conn["chunks_written"]


# -- 4. the official openai SDK on /v1/chat/completions ------------------------------------


@pytest.mark.parametrize(
    ("model", "provider", "upstream_model"),
    [("openai/e2e-gpt", "openai", "e2e-gpt"), ("gemini/e2e-gemini", "gemini", "e2e-gemini")],
    ids=PROVIDERS,
)
async def test_openai_sdk_streams_chat_completions_from_each_provider(
    model: str,
    provider: str,
    upstream_model: str,
    server: ServerProcess,
    upstreams: dict[str, UpstreamProcess],
) -> None:
    nonce, n = new_nonce(), 6
    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="e2e", max_retries=0, timeout=10
    )
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"{nonce} [fake tokens={n}]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()

    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == expected_text(n)
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n
    assert len({c.id for c in chunks}) == 1

    stats = await fake_stats(upstreams[provider])
    req = request_of(stats, nonce)
    assert req is not None, f"{model} did not reach the {provider} upstream"
    if provider == "openai":
        assert json.loads(req["body"])["model"] == upstream_model
    else:
        assert f"/models/{upstream_model}:streamGenerateContent" in req["target"]


async def test_openai_sdk_sees_max_tokens_cut_as_finish_length(server: ServerProcess) -> None:
    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="e2e", max_retries=0, timeout=10
    )
    try:
        for model in ("openai/e2e-gpt", "gemini/e2e-gemini"):
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "[fake tokens=9]"}],
                stream=True,
                max_tokens=3,
            )
            chunks = [c async for c in stream if c.choices]
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(3)
            assert chunks[-1].choices[0].finish_reason == "length", model
    finally:
        await client.close()

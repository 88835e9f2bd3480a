"""Providers against local upstreams that speak the real wire formats, over loopback sockets.

Every client of each API does the HTTP: the real SDKs, and the lean client (kinds
``openai-lean``, ``gemini-lean``); the fakes (tests/upstreams) record each connection's close
time, so "the upstream connection is closed within 100 ms of a cancel" (SPEC §7) is measured
at the upstream's socket, not inferred from the client side, and each request, so that a
client's retries are counted where they arrive. Every client's retry backoff is 1 ms here
(``tests.support.retries``), and the failures that are retried say a short ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from google import genai
from google.genai import types

from sseserver.providers.base import (
    Delta,
    GenerationRequest,
    Message,
    ProviderError,
    UpstreamConnectionError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from sseserver.providers.gemini import GeminiProvider
from sseserver.providers.gemini_lean import LeanGeminiProvider
from sseserver.providers.openai import OpenAIProvider
from sseserver.providers.openai_lean import LeanOpenAIProvider
from tests.support.mock_transport import ask
from tests.support.procs import ROOT
from tests.support.retries import short_backoff  # noqa: F401  (autouse: 1 ms backoff)
from tests.upstreams import ConnectionRecord, FakeUpstream, expected_text
from tests.upstreams.gemini_wire import GeminiWire
from tests.upstreams.openai_wire import OpenAIWire

CANCEL_BUDGET_S = 0.100  # SPEC §7
RETRIES = 2  # before the first byte, every client's at most (SPEC §7)


# The concrete classes, not the Provider protocol: their ``stream`` is an async generator,
# which ``contextlib.aclosing`` and ``aclose()`` need.
AnyProvider = OpenAIProvider | LeanOpenAIProvider | GeminiProvider | LeanGeminiProvider


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    wire: type[FakeUpstream]
    provider: Callable[..., AnyProvider]

    @property
    def api(self) -> str:
        """The API spoken: "openai" for both OpenAI clients, "gemini" for both Gemini ones."""
        return self.wire.api_name


KINDS = [
    Kind("openai", OpenAIWire, OpenAIProvider),
    Kind("gemini", GeminiWire, GeminiProvider),
    Kind("openai-lean", OpenAIWire, LeanOpenAIProvider),
    Kind("gemini-lean", GeminiWire, LeanGeminiProvider),
]


@dataclass(slots=True)
class Env:
    kind: Kind
    up: FakeUpstream
    provider: AnyProvider


@contextlib.asynccontextmanager
async def environment(kind: Kind, timeout_s: float = 5.0) -> AsyncIterator[Env]:
    up = await kind.wire().start()
    provider = kind.provider(base_url=up.base_url, api_key="test-key", timeout_s=timeout_s)
    try:
        yield Env(kind, up, provider)
    finally:
        await provider.aclose()
        await up.aclose()
        assert up.errors == []


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    async with environment(request.param, timeout_s=0.5) as e:
        yield e


async def collect(provider: AnyProvider, request: GenerationRequest) -> list[Delta]:
    return [d async for d in provider.stream(request)]


async def started_stream(
    env: Env, prompt: str
) -> tuple[AsyncGenerator[Delta, None], ConnectionRecord]:
    """A stream that has yielded its first delta, and its upstream connection."""
    gen = env.provider.stream(ask(prompt))
    await anext(gen)
    return gen, env.up.requests[-1].connection


async def measure_close(env: Env, rec: ConnectionRecord, t0: float) -> float:
    """Seconds from ``t0`` until the upstream saw ``rec`` closed (inf if not within 1 s)."""
    assert await env.up.wait_closed(rec, within=1.0), f"{env.kind.name}: upstream left open"
    assert rec.closed_at is not None
    assert rec.closed_by == "peer"
    return rec.closed_at - t0


# --------------------------------------------------------------------------------------
# Happy path
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_deltas_in_order_then_finish_and_usage(env: Env) -> None:
    deltas = await collect(
        env.provider,
        ask("hello there [fake tokens=7]", system="Be brief.", temperature=0.25, max_tokens=50),
    )
    *texts, last = deltas
    assert "".join(d.text for d in texts) == expected_text(7)
    assert all(d.text and d.finish_reason is None for d in texts)
    assert last.text == ""
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert last.usage.completion_tokens == 7
    assert last.usage.prompt_tokens == 6  # the fakes count the prompt's words
    assert last.usage.total_tokens == 13

    body = env.up.requests[-1].json()
    if env.kind.api == "openai":
        assert body["model"] == "gpt-4o-mini"
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert body["messages"][1]["role"] == "user"
        assert (body["temperature"], body["max_tokens"]) == (0.25, 50)
        assert env.up.requests[-1].headers["authorization"] == "Bearer test-key"
    else:
        assert "/models/gemini-2.5-flash:streamGenerateContent" in env.up.requests[-1].path
        assert env.up.requests[-1].query == "alt=sse"
        assert body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
        assert body["contents"][0]["role"] == "user"
        assert body["generationConfig"] == {"temperature": 0.25, "maxOutputTokens": 50}
        assert env.up.requests[-1].headers["x-goog-api-key"] == "test-key"


@pytest.mark.timeout(60)
async def test_history_roles_and_model_pass_through(env: Env) -> None:
    request = GenerationRequest(
        model="some-model",
        messages=(Message("user", "a"), Message("assistant", "b"), Message("user", "c")),
    )
    await collect(env.provider, request)
    req = env.up.requests[-1]
    body = req.json()
    if env.kind.api == "openai":
        assert body["model"] == "some-model"
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    else:
        assert "/models/some-model:" in req.path
        assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]


@pytest.mark.timeout(60)
async def test_max_tokens_cut_is_finish_length(env: Env) -> None:
    deltas = await collect(env.provider, ask("[fake tokens=9]", max_tokens=3))
    assert "".join(d.text for d in deltas) == expected_text(3)
    assert deltas[-1].finish_reason == "length"


@pytest.mark.timeout(60)
async def test_finished_stream_keeps_connection_pooled_until_aclose(env: Env) -> None:
    await collect(env.provider, ask("[fake tokens=2]"))
    await collect(env.provider, ask("[fake tokens=2]"))
    recs = env.up.api_connections()
    assert len(recs) == 1 and recs[0].requests == 2  # a fully read response is reused
    t0 = time.monotonic()
    await env.provider.aclose()
    assert await measure_close(env, recs[0], t0) < CANCEL_BUDGET_S


# --------------------------------------------------------------------------------------
# Failures -> ProviderError subclasses
# --------------------------------------------------------------------------------------

# (directive, class, code, retryable, status, retry_after_s, deltas before the error). The
# statuses every client retries say a short Retry-After, which the retries wait for.
FAILURES: list[tuple[str, type[ProviderError], str, bool, int | None, float | None, int]] = [
    ("fail=401", UpstreamHTTPError, "upstream_401", False, 401, None, 0),
    ("fail=429 retry_after=0.02", UpstreamHTTPError, "rate_limited", True, 429, 0.02, 0),
    ("fail=500", UpstreamHTTPError, "upstream_500", True, 500, None, 0),
    ("fail=503 retry_after=0.01", UpstreamHTTPError, "upstream_503", True, 503, 0.01, 0),
    ("fail=404", UpstreamHTTPError, "upstream_404", False, 404, None, 0),
    ("fail=hang", UpstreamTimeout, "upstream_timeout", True, None, None, 0),
    ("fail=stall after=2", UpstreamTimeout, "upstream_timeout", True, None, None, 2),
    (
        "fail=drop after=2",
        UpstreamConnectionError,
        "upstream_connection_error",
        True,
        None,
        None,
        2,
    ),
    (
        "fail=drop after=0",
        UpstreamConnectionError,
        "upstream_connection_error",
        True,
        None,
        None,
        0,
    ),
    (
        "fail=malformed after=1",
        UpstreamProtocolError,
        "upstream_protocol_error",
        False,
        None,
        None,
        1,
    ),
    ("fail=shape after=1", UpstreamProtocolError, "upstream_protocol_error", False, None, None, 1),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("directive", "cls", "code", "retryable", "status", "retry_after_s", "before"),
    FAILURES,
    ids=[f[0] for f in FAILURES],
)
async def test_failure_maps_to_provider_error(
    env: Env,
    directive: str,
    cls: type[ProviderError],
    code: str,
    retryable: bool,
    status: int | None,
    retry_after_s: float | None,
    before: int,
) -> None:
    deltas: list[Delta] = []
    with pytest.raises(cls) as info:
        async for d in env.provider.stream(ask(f"x [fake tokens=5 {directive}]")):
            deltas.append(d)
    exc = info.value
    assert (exc.code, exc.retryable, exc.status, exc.retry_after_s) == (
        code,
        retryable,
        status,
        retry_after_s,
    )
    assert "".join(d.text for d in deltas) == expected_text(before)
    if cls is not UpstreamProtocolError:
        assert exc.__cause__ is not None  # the SDK's error, kept for the server log
    assert "sk-fake" not in exc.message  # the upstream's words (OpenAI echoes keys) stay out
    # Nothing of a failed stream stays open, except a fully read error answer in the pool.
    assert await env.up.wait_until(lambda: env.up.open_connections() <= 1, 1.0)


@pytest.mark.timeout(60)
async def test_error_event_mid_stream_is_retryable_error(env: Env) -> None:
    with pytest.raises(ProviderError) as info:
        await collect(env.provider, ask("[fake fail=error_event after=1]"))
    assert info.value.retryable


@pytest.mark.timeout(60)
async def test_gemini_retry_delay_from_error_details() -> None:
    # The Gemini API says how long to wait in a google.rpc.RetryInfo detail, not a header.
    async with environment(KINDS[1]) as env:
        with pytest.raises(UpstreamHTTPError) as info:
            await collect(env.provider, ask("[fake fail=429]"))
    assert info.value.code == "rate_limited"
    assert info.value.retry_after_s == 1.0


@pytest.mark.timeout(60)
async def test_wrong_api_key_is_401_or_400_not_retryable() -> None:
    for kind in KINDS:
        up = await kind.wire(api_key="right").start()
        provider = kind.provider(base_url=up.base_url, api_key="wrong")
        try:
            with pytest.raises(UpstreamHTTPError) as info:
                await collect(provider, ask("hi"))
            assert info.value.status in (400, 401)
            assert not info.value.retryable
        finally:
            await provider.aclose()
            await up.aclose()


# --------------------------------------------------------------------------------------
# Cancellation closes the upstream connection within 100 ms (SPEC §7)
# --------------------------------------------------------------------------------------


async def _cancel_consumer_reading(env: Env) -> float:
    """Cancel a task that is waiting inside the provider for the next delta."""
    got = asyncio.Event()
    deltas: list[Delta] = []

    async def consume() -> None:
        async for d in env.provider.stream(ask("[fake tokens=1000 interval_ms=20]")):
            deltas.append(d)
            if len(deltas) == 3:
                got.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 5)
    await asyncio.sleep(0.005)  # inside the provider, waiting for the next token
    rec = env.up.requests[-1].connection
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # CancelledError is never swallowed
    latency = await measure_close(env, rec, t0)
    written = rec.chunks_written
    await asyncio.sleep(0.05)
    assert rec.chunks_written == written < 1000  # the upstream stopped producing
    return latency


async def _cancel_consumer_elsewhere(env: Env) -> float:
    """Cancel a task that is busy outside the provider (a slow client), the stream held
    by ``contextlib.aclosing`` as the application does."""
    got = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(
            env.provider.stream(ask("[fake tokens=1000 interval_ms=1]"))
        ) as gen:
            async for _ in gen:
                got.set()
                await asyncio.sleep(30)  # e.g. waiting for a slow client to drain

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 5)
    await asyncio.sleep(0.02)  # let the upstream fill the socket buffers meanwhile
    rec = env.up.requests[-1].connection
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return await measure_close(env, rec, t0)


async def _aclose_generator(env: Env) -> float:
    gen, rec = await started_stream(env, "[fake tokens=1000 interval_ms=5]")
    await anext(gen)
    t0 = time.monotonic()
    await gen.aclose()
    return await measure_close(env, rec, t0)


async def _cancel_before_first_byte(env: Env) -> float:
    task = asyncio.create_task(collect(env.provider, ask("[fake fail=hang]")))
    assert await env.up.wait_for_requests(len(env.up.requests) + 1, 5)
    rec = env.up.requests[-1].connection
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return await measure_close(env, rec, t0)


async def _cancel_stalled_stream(env: Env) -> float:
    gen, rec = await started_stream(env, "[fake tokens=10 fail=stall after=3]")
    task = asyncio.create_task(collect_rest(gen))
    await env.up.wait_until(lambda: rec.chunks_written >= 3, 5)
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return await measure_close(env, rec, t0)


async def collect_rest(gen: AsyncIterator[Delta]) -> list[Delta]:
    return [d async for d in gen]


CANCEL_WAYS = {
    "task-cancel-while-reading": _cancel_consumer_reading,
    "task-cancel-while-elsewhere": _cancel_consumer_elsewhere,
    "generator-aclose": _aclose_generator,
    "task-cancel-before-first-byte": _cancel_before_first_byte,
    "task-cancel-stalled-stream": _cancel_stalled_stream,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("way", list(CANCEL_WAYS))
async def test_cancel_closes_upstream_connection_within_100ms(env: Env, way: str) -> None:
    latency = await CANCEL_WAYS[way](env)
    assert latency < CANCEL_BUDGET_S, f"{env.kind.name} {way}: {latency * 1000:.1f} ms"
    # The next generation gets a fresh connection: the half-read one was not pooled.
    before = len(env.up.api_connections())
    await collect(env.provider, ask("[fake tokens=2]"))
    assert len(env.up.api_connections()) == before + 1
    assert env.up.open_connections() == 1  # just the fresh, pooled one


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_cancel_latency_distribution(kind: Kind) -> None:
    """Median and worst over many tries (CANCEL_TRIES, default 30; run with -s to see)."""
    tries = int(os.environ.get("CANCEL_TRIES", "30"))
    results: dict[str, list[float]] = {}
    async with environment(kind) as env:
        for way in ("task-cancel-while-reading", "task-cancel-while-elsewhere", "generator-aclose"):
            results[way] = [await CANCEL_WAYS[way](env) for _ in range(tries)]
    for way, lat in results.items():
        print(
            f"\n{kind.name:11} {way:28} n={len(lat)} median={statistics.median(lat) * 1000:.2f} ms"
            f" worst={max(lat) * 1000:.2f} ms"
        )
        assert max(lat) < CANCEL_BUDGET_S


# --------------------------------------------------------------------------------------
# --openai-client, --gemini-client: the SDK and the other clients are exchangeable
# --------------------------------------------------------------------------------------

# Each API's SDK kind (named after the API) against its lean client.
SDK_KINDS = {k.api: k for k in KINDS if k.name == k.api}
LEAN_KINDS = [k for k in KINDS if k.name != k.api]
# The request headers that matter upstream, per API.
SENT_HEADERS = {
    "openai": ("authorization", "content-type", "accept"),
    "gemini": ("x-goog-api-key", "content-type"),
}

EQUIVALENT_REQUESTS = {
    "tokens-system-params": ask(
        "hello there [fake tokens=7]", system="Be brief.", temperature=0.25, max_tokens=50
    ),
    "finish-length": ask("[fake tokens=9]", max_tokens=3),
    "one-token": ask("one two three [fake tokens=1]"),
    "no-text": ask("[fake tokens=0]"),
    "history-and-model": GenerationRequest(
        model="some-model",
        messages=(Message("user", "a"), Message("assistant", "b"), Message("user", "c d")),
        temperature=0.0,
    ),
    "slow-tokens": ask("[fake tokens=4 interval_ms=5 ttft_ms=20]"),
}
EQUIVALENT_FAILURES = [f[0] for f in FAILURES] + [
    "fail=429",  # OpenAI: the fake's default Retry-After, 1; Gemini: a RetryInfo detail
    "fail=error_event after=1",
    "fail=error_event after=0",
    "fail=408",
    "fail=409",
    "fail=418",
    "fail=502 retry_after=0.05",
]
# Where the SDKs retry and the lean client does not (providers/openai.py, gemini.py): a
# wait for the answer's head that timed out.
SDK_ONLY_RETRIES = ("fail=hang",)


@dataclass(frozen=True, slots=True)
class Outcome:
    """All a client's caller can tell of one generation, and what the upstream received."""

    deltas: list[Delta]
    error: tuple[type[ProviderError], str, str, bool, int | None, float | None] | None
    sent: Any  # the request body, as JSON
    headers: dict[str, str]  # the request headers that matter upstream
    attempts: int  # the requests the upstream received: 1, plus the client's retries


async def outcome(kind: Kind, request: GenerationRequest) -> Outcome:
    async with environment(kind, timeout_s=0.3) as env:
        deltas: list[Delta] = []
        error = None
        try:
            async for d in env.provider.stream(request):
                deltas.append(d)
        except ProviderError as exc:
            error = (type(exc), exc.code, exc.message, exc.retryable, exc.status, exc.retry_after_s)
        req = env.up.requests[-1]
        names = SENT_HEADERS[kind.api]
        headers = {n: req.headers[n] for n in names}
        return Outcome(deltas, error, req.json(), headers, len(env.up.requests))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lean", LEAN_KINDS, ids=[k.name for k in LEAN_KINDS])
@pytest.mark.parametrize("name", list(EQUIVALENT_REQUESTS))
async def test_clients_of_one_api_give_the_same_deltas(name: str, lean: Kind) -> None:
    request = EQUIVALENT_REQUESTS[name]
    sdk, ours = await outcome(SDK_KINDS[lean.api], request), await outcome(lean, request)
    assert sdk.error is None and sdk.deltas[-1].finish_reason is not None
    assert ours == sdk


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lean", LEAN_KINDS, ids=[k.name for k in LEAN_KINDS])
@pytest.mark.parametrize("directive", EQUIVALENT_FAILURES)
async def test_clients_of_one_api_fail_alike(directive: str, lean: Kind) -> None:
    """The same error after the same retries: a failure one client retries, the other
    retries as often."""
    request = ask(f"x [fake tokens=5 {directive}]", max_tokens=20)
    sdk, ours = await outcome(SDK_KINDS[lean.api], request), await outcome(lean, request)
    assert sdk.error is not None
    if directive in SDK_ONLY_RETRIES:
        assert (sdk.attempts, ours.attempts) == (1 + RETRIES, 1)
        sdk = dataclasses.replace(sdk, attempts=ours.attempts)
    assert ours == sdk


# --------------------------------------------------------------------------------------
# Retries before the first byte (SPEC §7), counted at the upstream
# --------------------------------------------------------------------------------------

# (directive, requests one call makes: lean client, SDK)
ATTEMPTS: list[tuple[str, int, int]] = [
    ("fail=408", 1 + RETRIES, 1 + RETRIES),
    ("fail=409", 1 + RETRIES, 1 + RETRIES),
    ("fail=429 retry_after=0.01", 1 + RETRIES, 1 + RETRIES),
    ("fail=500", 1 + RETRIES, 1 + RETRIES),
    ("fail=599", 1 + RETRIES, 1 + RETRIES),
    ("fail=400", 1, 1),
    ("fail=401", 1, 1),
    ("fail=404", 1, 1),
    ("fail=418", 1, 1),
    ("fail=drop after=0", 1, 1),  # the answer's head had arrived: nothing is retried
    ("fail=error_event after=0", 1, 1),
    ("fail=hang", 1, 1 + RETRIES),  # see SDK_ONLY_RETRIES
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@pytest.mark.parametrize(("directive", "lean", "sdk"), ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
async def test_retries_before_the_first_byte(
    directive: str, lean: int, sdk: int, kind: Kind
) -> None:
    async with environment(kind, timeout_s=0.2) as env:
        with pytest.raises(ProviderError):
            await collect(env.provider, ask(f"x [fake tokens=5 {directive}]"))
        assert len(env.up.requests) == (sdk if kind in SDK_KINDS.values() else lean)
        # A retried call sent the same request each time.
        assert len({r.body for r in env.up.requests}) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_retries_wait_what_retry_after_says(kind: Kind) -> None:
    wait = 0.1
    async with environment(kind) as env:
        t0 = time.monotonic()
        with pytest.raises(UpstreamHTTPError) as info:
            await collect(env.provider, ask(f"x [fake fail=503 retry_after={wait}]"))
        took = time.monotonic() - t0
        assert len(env.up.requests) == 1 + RETRIES
    assert info.value.retry_after_s == wait
    if kind.name == "gemini":
        # google-genai waits its own backoff (1 ms here), never what Retry-After says.
        assert took < RETRIES * wait, took
    else:
        assert took >= RETRIES * wait * 0.95, took


# --------------------------------------------------------------------------------------
# No leaks after many failures
# --------------------------------------------------------------------------------------

MIXED = [
    "fail=401",
    "fail=429 retry_after=0.01",
    "fail=500",
    "fail=503",
    "fail=hang",
    "fail=stall after=1",
    "fail=drop after=1",
    "fail=malformed after=1",
    "fail=shape after=1",
    "fail=error_event after=1",
    "cancel",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_200_mixed_failures_leak_no_connection_and_no_task(kind: Kind) -> None:
    baseline = asyncio.all_tasks()
    env_cm = environment(kind, timeout_s=0.1)
    env = await env_cm.__aenter__()
    try:

        async def one(i: int) -> str:
            what = MIXED[i % len(MIXED)]
            if what == "cancel":
                task = asyncio.create_task(
                    collect(env.provider, ask("[fake tokens=1000 interval_ms=2]"))
                )
                await asyncio.sleep(0.02)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return "cancelled"
            with pytest.raises(ProviderError) as info:
                await collect(env.provider, ask(f"[fake tokens=5 {what}]"))
            return type(info.value).__name__

        outcomes: list[str] = []
        for batch in range(10):  # 10 batches of 20 concurrent generations = 200 failures
            outcomes += await asyncio.gather(*(one(batch * 20 + i) for i in range(20)))
        assert len(outcomes) == 200
        assert {"UpstreamHTTPError", "UpstreamTimeout", "UpstreamConnectionError"} <= set(outcomes)
        # Only fully read error answers may stay pooled, at most one per concurrent call.
        assert await env.up.wait_until(lambda: env.up.open_connections() <= 20, 1.0)
        await env.provider.aclose()
        assert await env.up.wait_until(lambda: env.up.open_connections() == 0, 1.0), [
            (c, [r.body for r in env.up.requests if r.connection is c])
            for c in env.up.api_connections()
            if c.is_open
        ]
    finally:
        await env_cm.__aexit__(None, None, None)
    gc.collect()
    await asyncio.sleep(0.05)  # let finalizers of abandoned generators run, if any
    leftover = {t for t in asyncio.all_tasks() - baseline if not t.done()}
    assert leftover == set(), leftover


# --------------------------------------------------------------------------------------
# The fakes as subprocesses (python -m tests.upstreams.<api>_wire)
# --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def subprocess_upstream(module: str) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "--port",
        "0",
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.startswith(b"LISTENING "), line
        yield line.split()[1].decode()
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_fake_upstream_as_subprocess(kind: Kind) -> None:
    module = f"tests.upstreams.{kind.api}_wire"
    async with subprocess_upstream(module) as url, httpx.AsyncClient(base_url=url) as control:
        base_url = f"{url}/v1" if kind.api == "openai" else f"{url}/"
        provider = kind.provider(base_url=base_url, timeout_s=5)
        try:
            deltas = await collect(provider, ask("[fake tokens=3]"))
            assert "".join(d.text for d in deltas) == expected_text(3)
            gen = provider.stream(ask("[fake tokens=1000 interval_ms=5]"))
            await anext(gen)
            t0 = time.monotonic()
            await gen.aclose()
            stats: dict[str, Any] = {}
            for _ in range(100):  # bounded poll of the other process's records
                stats = (await control.get("/_fake/stats")).json()
                if stats["open"] == 0:
                    break
                await asyncio.sleep(0.01)
            # The finished first call's connection carried the second call too (keep-alive),
            # and is the one closed; no other connection is left open.
            assert stats["open"] == 0, json.dumps(stats)
            (closed,) = stats["connections"]
            assert closed["requests"] == 2 and closed["closed_by"] == "peer"
            # time.monotonic() is one clock for every process of the machine
            assert closed["closed_at"] - t0 < CANCEL_BUDGET_S
            assert (await control.post("/_fake/reset")).json() == {"ok": True}
        finally:
            await provider.aclose()


# --------------------------------------------------------------------------------------
# The fakes' non-streaming answers, read by the real SDKs
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_openai_wire_non_streaming_answer_parses_in_the_sdk() -> None:
    async with OpenAIWire() as up:
        client = openai.AsyncOpenAI(base_url=up.base_url, api_key="k", max_retries=0)
        try:
            completion = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "two words [fake tokens=4]"}]
            )
        finally:
            await client.close()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected_text(4)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 4


@pytest.mark.timeout(60)
async def test_gemini_wire_non_streaming_answer_parses_in_the_sdk() -> None:
    async with GeminiWire() as up:
        client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=up.base_url))
        try:
            answer = await client.aio.models.generate_content(
                model="gemini-2.5-flash", contents="two words [fake tokens=4]"
            )
        finally:
            await client.aio.aclose()
    assert answer.text == expected_text(4)
    assert answer.candidates and answer.candidates[0].finish_reason == types.FinishReason.STOP
    assert answer.usage_metadata is not None
    assert answer.usage_metadata.candidates_token_count == 4

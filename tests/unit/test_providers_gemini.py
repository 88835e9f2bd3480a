"""sseserver.providers.gemini without sockets: recorded ``streamGenerateContent?alt=sse``
events replayed to the real ``google-genai`` SDK through ``httpx.MockTransport`` (socket
tests, including the close-on-cancel measurement: tests/protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest

from sseserver.providers import load
from sseserver.providers.base import (
    BadRequest,
    Delta,
    GenerationRequest,
    Message,
    ProviderError,
    UpstreamConnectionError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    Usage,
)
from sseserver.providers.gemini import GeminiProvider
from sseserver.providers.gemini_wire import PLACEHOLDER_API_KEY, retry_after
from tests.support.mock_transport import (
    Body,
    Upstream,
    ask,
    no_sockets,  # noqa: F401  (autouse: no test here opens a socket)
    raising,
    run,
    sse_response,
)
from tests.support.retries import short_backoff  # noqa: F401  (autouse: 1 ms backoff)

BASE_URL = "http://gemini.test/"


def event(obj: Any) -> bytes:
    # Google ends each event with CRLF CRLF.
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


def usage(candidates: int) -> dict[str, Any]:
    return {
        "promptTokenCount": 9,
        "candidatesTokenCount": candidates,
        "totalTokenCount": 29 + candidates,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}],
        "thoughtsTokenCount": 20,
    }


def response(text: str, n: int, finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    return {
        "candidates": [candidate],
        "usageMetadata": usage(n),
        "modelVersion": "gemini-2.5-flash",
        "responseId": "rid-1",
    }


# A stream as generativelanguage.googleapis.com sent it (a thinking model: usage counts
# thoughts; the finish reason rides on the last text chunk).
RECORDED = [event(response("Hel", 1)), event(response("lo!", 2, "STOP"))]


@pytest.fixture(autouse=True)
def no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI"):
        monkeypatch.delenv(name, raising=False)


def provider_for(upstream: Upstream, **kw: Any) -> GeminiProvider:
    kw.setdefault("api_key", "g-test")
    return GeminiProvider(base_url=BASE_URL, transport=httpx.MockTransport(upstream), **kw)


async def test_recorded_stream_gives_deltas_then_finish_and_usage() -> None:
    body = Body(RECORDED)
    deltas = await run(provider_for(Upstream(sse_response(body))))
    # completion_tokens counts the 20 thinking tokens, as OpenAI's counts reasoning
    assert deltas == [
        Delta(text="Hel"),
        Delta(text="lo!"),
        Delta(finish_reason="stop", usage=Usage(9, 22, 31)),
    ]
    assert body.closed


async def test_request_maps_roles_system_and_parameters() -> None:
    upstream = Upstream(sse_response(Body(RECORDED)))
    request = GenerationRequest(
        model="gemini-test",
        messages=(
            Message("system", "Use French."),
            Message("user", "a"),
            Message("assistant", "b"),
            Message("user", "c"),
        ),
        system="Be brief.",
        temperature=0.5,
        max_tokens=20,
    )
    await run(provider_for(upstream), request)
    sent = upstream.requests[-1]
    assert sent.url.path.endswith("/models/gemini-test:streamGenerateContent")
    assert sent.url.params["alt"] == "sse"
    assert sent.headers["x-goog-api-key"] == "g-test"
    body = upstream.body()
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "a"}]},
        {"role": "model", "parts": [{"text": "b"}]},
        {"role": "user", "parts": [{"text": "c"}]},
    ]
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief.\n\nUse French."}]
    assert body["generationConfig"] == {"temperature": 0.5, "maxOutputTokens": 20}


async def test_unset_parameters_are_not_sent_and_default_model_is_used() -> None:
    upstream = Upstream(sse_response(Body(RECORDED)))
    await run(provider_for(upstream, default_model="gemini-default"))
    sent = upstream.requests[-1]
    assert sent.url.path.endswith("/models/gemini-default:streamGenerateContent")
    body = upstream.body()
    assert "systemInstruction" not in body
    assert not body.get("generationConfig")


@pytest.mark.parametrize(
    ("env", "given", "expected"),
    [
        ({}, None, PLACEHOLDER_API_KEY),
        ({"GOOGLE_API_KEY": "google"}, None, "google"),
        ({"GEMINI_API_KEY": "gemini", "GOOGLE_API_KEY": "google"}, None, "gemini"),
        ({"GEMINI_API_KEY": "gemini"}, "given", "given"),
    ],
)
async def test_api_key_fallbacks(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], given: str | None, expected: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    upstream = Upstream(sse_response(Body(RECORDED)))
    await run(provider_for(upstream, api_key=given))
    assert upstream.requests[-1].headers["x-goog-api-key"] == expected


@pytest.mark.parametrize(
    ("gemini", "ours"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("OTHER", "other"),
        ("MALFORMED_FUNCTION_CALL", "malformed_function_call"),
    ],
)
async def test_finish_reasons_in_openai_words(gemini: str, ours: str) -> None:
    body = Body([RECORDED[0], event(response("", 1, gemini))])
    deltas = await run(provider_for(Upstream(sse_response(body))))
    assert deltas[-1].finish_reason == ours


async def test_finish_on_a_separate_empty_chunk() -> None:
    body = Body(
        [event(response("Hel", 1)), event(response("lo!", 2)), event(response("", 2, "STOP"))]
    )
    deltas = await run(provider_for(Upstream(sse_response(body))))
    assert [d.text for d in deltas] == ["Hel", "lo!", ""]
    assert deltas[-1].finish_reason == "stop"


async def test_thought_parts_are_not_answer_text() -> None:
    thought = response("thinking...", 0)
    thought["candidates"][0]["content"]["parts"][0]["thought"] = True
    deltas = await run(provider_for(Upstream(sse_response(Body([event(thought), *RECORDED])))))
    assert "".join(d.text for d in deltas) == "Hello!"


async def test_blocked_prompt_finishes_as_content_filter() -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage(0)}
    deltas = await run(provider_for(Upstream(sse_response(Body([event(blocked)])))))
    assert deltas == [Delta(finish_reason="content_filter", usage=Usage(9, 20, 29))]


async def test_stream_ending_before_finish_reason_is_a_dropped_connection() -> None:
    with pytest.raises(UpstreamConnectionError) as info:
        await run(provider_for(Upstream(sse_response(Body(RECORDED[:1])))))
    assert info.value.retryable


def google_error(status: int, name: str, details: list[Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": "API key not valid: g-t***", "status": name}
    if details is not None:
        error["details"] = details
    return {"error": error}


RETRY_INFO = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]

RETRIES = 2  # the lean client's MAX_RETRIES, which the SDK is given

# (status, status name, headers, details, code, retryable, retry_after_s); the retryable
# ones are asked again, twice (google-genai waits its backoff, not Retry-After).
STATUS_CASES: list[tuple[int, str, dict[str, str], Any, str, bool, float | None]] = [
    (400, "INVALID_ARGUMENT", {}, None, "upstream_400", False, None),
    (401, "UNAUTHENTICATED", {}, None, "upstream_401", False, None),
    (403, "PERMISSION_DENIED", {}, None, "upstream_403", False, None),
    (404, "NOT_FOUND", {}, None, "upstream_404", False, None),
    (429, "RESOURCE_EXHAUSTED", {}, RETRY_INFO, "rate_limited", True, 37.0),
    (429, "RESOURCE_EXHAUSTED", {"retry-after": "3"}, RETRY_INFO, "rate_limited", True, 3.0),
    (429, "RESOURCE_EXHAUSTED", {}, None, "rate_limited", True, None),
    (500, "INTERNAL", {}, None, "upstream_500", True, None),
    (503, "UNAVAILABLE", {"retry-after": "5"}, None, "upstream_503", True, 5.0),
]


@pytest.mark.parametrize(
    ("status", "name", "headers", "details", "code", "retryable", "wait"), STATUS_CASES
)
async def test_http_status_maps_to_upstream_http_error(
    status: int,
    name: str,
    headers: dict[str, str],
    details: Any,
    code: str,
    retryable: bool,
    wait: float | None,
) -> None:
    upstream = Upstream(
        lambda r: httpx.Response(status, headers=headers, json=google_error(status, name, details))
    )
    with pytest.raises(UpstreamHTTPError) as info:
        await run(provider_for(upstream))
    exc = info.value
    assert (exc.code, exc.retryable, exc.status, exc.retry_after_s) == (
        code,
        retryable,
        status,
        wait,
    )
    assert name in exc.message
    assert "g-t" not in exc.message  # the upstream's own words stay out of client errors
    assert len(upstream.requests) == (1 + RETRIES if retryable else 1)


# (status, requests one call makes): what the lean client retries (SPEC §7)
RETRY_CASES = [(408, 1 + RETRIES), (409, 1 + RETRIES), (502, 1 + RETRIES), (599, 1 + RETRIES)]
RETRY_CASES += [(400, 1), (404, 1), (418, 1), (422, 1)]


@pytest.mark.parametrize(("status", "attempts"), RETRY_CASES)
async def test_sdk_retries_the_statuses_the_lean_client_retries(status: int, attempts: int) -> None:
    upstream = Upstream(lambda r: httpx.Response(status, json=google_error(status, "X")))
    with pytest.raises(UpstreamHTTPError) as info:
        await run(provider_for(upstream))
    assert info.value.status == status
    assert len(upstream.requests) == attempts
    assert len({r.content for r in upstream.requests}) == 1  # the same request each time


async def test_error_event_in_stream_maps_like_a_status() -> None:
    body = Body([RECORDED[0], event(google_error(503, "UNAVAILABLE"))])
    with pytest.raises(UpstreamHTTPError) as info:
        await run(provider_for(Upstream(sse_response(body))))
    assert (info.value.code, info.value.retryable) == ("upstream_503", True)
    assert body.closed


# (failure, error, requests one call makes): google-genai retries a refused connection and
# a timeout (the lean client: not a timeout), not a connection closed before the head (the
# lean client does).
@pytest.mark.parametrize(
    ("exc", "cls", "attempts"),
    [
        (httpx.ReadTimeout("t"), UpstreamTimeout, 1 + RETRIES),
        (httpx.ConnectTimeout("t"), UpstreamTimeout, 1 + RETRIES),
        (httpx.ConnectError("refused"), UpstreamConnectionError, 1 + RETRIES),
        (httpx.RemoteProtocolError("bad"), UpstreamConnectionError, 1),
    ],
)
async def test_transport_failure_before_answer(
    exc: Exception, cls: type[ProviderError], attempts: int
) -> None:
    upstream = Upstream(raising(exc))
    with pytest.raises(cls) as info:
        await run(provider_for(upstream))
    assert info.value.retryable
    assert len(upstream.requests) == attempts


@pytest.mark.parametrize(
    ("failure", "cls"),
    [
        (httpx.RemoteProtocolError("incomplete chunked read"), UpstreamConnectionError),
        (httpx.ReadError("reset"), UpstreamConnectionError),
        (httpx.ReadTimeout("t"), UpstreamTimeout),
    ],
)
async def test_transport_failure_mid_stream(failure: Exception, cls: type[ProviderError]) -> None:
    body = Body([RECORDED[0], failure])
    upstream = Upstream(sse_response(body))
    got: list[Delta] = []
    provider = provider_for(upstream)
    with pytest.raises(cls) as info:
        try:
            async for d in provider.stream(ask()):
                got.append(d)
        finally:
            await provider.aclose()
    assert [d.text for d in got] == ["Hel"]
    assert info.value.retryable
    assert body.closed
    assert len(upstream.requests) == 1  # the SDK did not resume with a new request


@pytest.mark.parametrize(
    "bad",
    [
        b'data: {"candidates": [{"content": {"parts": [{"text": "tr\r\n\r\n',
        event({"candidates": [{"content": {"parts": [{"text": 42}], "role": "model"}}]}),
        event({"candidates": [], "usageMetadata": {"totalTokenCount": "many"}}),
    ],
)
async def test_malformed_chunk_is_protocol_error(bad: bytes) -> None:
    body = Body([RECORDED[0], bad, RECORDED[1]])
    with pytest.raises(UpstreamProtocolError) as info:
        await run(provider_for(Upstream(sse_response(body))))
    assert not info.value.retryable
    assert body.closed


async def test_generator_aclose_mid_stream_closes_the_response() -> None:
    # googleapis/python-genai#2425: closing the SDK's stream leaves the response open.
    body = Body([*RECORDED[:1], *RECORDED], gate=asyncio.Event())  # never set: a stalled upstream
    provider = provider_for(Upstream(sse_response(body)))
    gen = provider.stream(ask())
    assert await anext(gen) == Delta(text="Hel")
    assert not body.closed
    await gen.aclose()
    assert body.closed
    await provider.aclose()


async def test_cancelling_a_consumer_busy_elsewhere_closes_the_response() -> None:
    body = Body([*RECORDED[:1], *RECORDED], gate=asyncio.Event())  # never set: a stalled upstream
    provider = provider_for(Upstream(sse_response(body)))
    first = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(provider.stream(ask())) as gen:
            async for _ in gen:
                first.set()
                await asyncio.Event().wait()  # a slow client, not the provider

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert body.closed
    await provider.aclose()


async def test_registry_loads_the_provider() -> None:
    provider = load("gemini", base_url=BASE_URL, api_key="k", default_model="m")
    try:
        assert isinstance(provider, GeminiProvider)
        assert (provider.name, provider.default_model) == ("gemini", "m")
    finally:
        await provider.aclose()


def test_retry_after_sources() -> None:
    assert retry_after({}) is None
    assert retry_after({"retry-after": "4"}) == 4.0
    assert retry_after({}, {"error": {"details": RETRY_INFO}}) == 37.0
    assert retry_after({}, {"details": [{"@type": "x.RetryInfo", "retryDelay": "0.5s"}]}) == 0.5
    assert retry_after({}, {"error": {"details": [{"@type": "other", "retryDelay": "9s"}]}}) is None
    assert (
        retry_after({}, {"error": {"details": [{"@type": "x.RetryInfo", "retryDelay": "x"}]}})
        is None
    )
    assert retry_after({}, "not a dict") is None


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(model=None, messages=(Message("tool", "x"),)),
        GenerationRequest(model=None, messages=(Message("system", "only a system turn"),)),
        GenerationRequest(model=None, messages=()),
        ask(temperature=2.5),
        ask(max_tokens=0),
    ],
)
async def test_validate_refuses_before_sending(request_: GenerationRequest) -> None:
    upstream = Upstream(sse_response(Body(RECORDED)))
    provider = provider_for(upstream)
    with pytest.raises(BadRequest):
        provider.validate(request_)
    with pytest.raises(BadRequest):
        await run(provider, request_)
    assert upstream.requests == []


async def test_models_offered_default_first() -> None:
    provider = GeminiProvider(api_key="k", default_model="gemini-2.5-pro")
    try:
        assert provider.models[0] == "gemini-2.5-pro"
        assert len(provider.models) == len(set(provider.models)) > 1
    finally:
        await provider.aclose()

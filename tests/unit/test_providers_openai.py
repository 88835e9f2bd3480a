"""sseserver.providers.openai without sockets: recorded wire chunks replayed to the real
``openai`` SDK through ``httpx.MockTransport`` (socket tests, and the lean client, which
talks to the network only: tests/protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from typing import Any

import httpx
import pytest

from sseserver.config import Config
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
from sseserver.providers.openai import PLACEHOLDER_API_KEY, OpenAIProvider, retry_after
from sseserver.providers.openai_lean import LeanOpenAIProvider
from sseserver.providers.synthetic import SyntheticProvider
from sseserver.web.context import configured_providers
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

# The class each --openai-client names (None: the provider's registered default).
CLIENTS: dict[str | None, type[OpenAIProvider | LeanOpenAIProvider]] = {
    None: OpenAIProvider,
    "sdk": OpenAIProvider,
    "lean": LeanOpenAIProvider,
}

BASE_URL = "http://openai.test/v1"

# A stream as api.openai.com sent it for stream_options.include_usage (ids shortened).
RECORDED = [
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini'
    b'","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content"'
    b':"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}\n\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini'
    b'","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":'
    b'null,"finish_reason":null}],"usage":null}\n\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini'
    b'","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"lo!"},"logprobs":'
    b'null,"finish_reason":null}],"usage":null}\n\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini'
    b'","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":null}\n\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini'
    b'","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens"'
    b':2,"total_tokens":11}}\n\n',
    b"data: [DONE]\n\n",
]


def chunk(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def provider_for(upstream: Upstream, **kw: Any) -> OpenAIProvider:
    kw.setdefault("api_key", "sk-test")
    return OpenAIProvider(base_url=BASE_URL, transport=httpx.MockTransport(upstream), **kw)


async def test_recorded_stream_gives_deltas_then_finish_and_usage() -> None:
    body = Body(RECORDED)
    deltas = await run(provider_for(Upstream(sse_response(body))))
    assert deltas == [
        Delta(text="Hel"),
        Delta(text="lo!"),
        Delta(finish_reason="stop", usage=Usage(9, 2, 11)),
    ]
    assert body.closed


async def test_request_carries_model_system_and_parameters() -> None:
    upstream = Upstream(sse_response(Body(RECORDED)))
    request = GenerationRequest(
        model="gpt-test",
        messages=(Message("user", "a"), Message("assistant", "b"), Message("user", "c")),
        system="Be brief.",
        temperature=0.5,
        max_tokens=20,
    )
    await run(provider_for(upstream), request)
    sent = upstream.requests[-1]
    assert sent.url == "http://openai.test/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert upstream.body() == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
        "max_tokens": 20,
    }


async def test_unset_parameters_are_not_sent_and_default_model_is_used() -> None:
    upstream = Upstream(sse_response(Body(RECORDED)))
    await run(provider_for(upstream, default_model="my-default"))
    body = upstream.body()
    assert body["model"] == "my-default"
    assert "temperature" not in body and "max_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("env", "given", "expected"),
    [
        ({}, None, PLACEHOLDER_API_KEY),
        ({"OPENAI_API_KEY": "sk-env"}, None, "sk-env"),
        ({"OPENAI_API_KEY": "sk-env"}, "sk-given", "sk-given"),
    ],
)
async def test_api_key_fallbacks(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    given: str | None,
    expected: str,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    upstream = Upstream(sse_response(Body(RECORDED)))
    await run(provider_for(upstream, api_key=given))
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {expected}"


async def test_usage_chunk_with_null_choices_as_vllm_sends_it() -> None:
    chunks = [
        *RECORDED[:4],
        chunk(
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": None,
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        ),
        b"data: [DONE]\n\n",
    ]
    deltas = await run(provider_for(Upstream(sse_response(Body(chunks)))))
    assert deltas[-1] == Delta(finish_reason="stop", usage=Usage(1, 2, 3))


async def test_stream_without_usage_still_finishes() -> None:
    deltas = await run(provider_for(Upstream(sse_response(Body([*RECORDED[:4], RECORDED[5]])))))
    assert deltas[-1] == Delta(finish_reason="stop", usage=None)


async def test_stream_ending_cleanly_without_finish_reason_finishes() -> None:
    """Some OpenAI-compatible servers send no finish reason; a body that ends cleanly
    (its terminator, with or without ``[DONE]``) is a complete answer."""
    for tail in ([], [b"data: [DONE]\n\n"]):
        body = Body([*RECORDED[:2], *tail])
        deltas = await run(provider_for(Upstream(sse_response(body))))
        assert deltas[-1] == Delta(finish_reason="stop", usage=None)
        assert "".join(d.text for d in deltas)


# (status, headers, code, retryable, retry_after_s)
STATUS_CASES: list[tuple[int, dict[str, str], str, bool, float | None]] = [
    (400, {}, "upstream_400", False, None),
    (401, {}, "upstream_401", False, None),
    (403, {}, "upstream_403", False, None),
    (404, {}, "upstream_404", False, None),
    (408, {}, "upstream_408", True, None),
    (429, {"retry-after": "20"}, "rate_limited", True, 20.0),
    (429, {"retry-after-ms": "1500", "retry-after": "2"}, "rate_limited", True, 1.5),
    (429, {}, "rate_limited", True, None),
    (500, {}, "upstream_500", True, None),
    (502, {}, "upstream_502", True, None),
    (503, {"retry-after": "5"}, "upstream_503", True, 5.0),
]


@pytest.mark.parametrize(("status", "headers", "code", "retryable", "wait"), STATUS_CASES)
async def test_http_status_maps_to_upstream_http_error(
    status: int,
    headers: dict[str, str],
    code: str,
    retryable: bool,
    wait: float | None,
) -> None:
    body = {
        "error": {
            "message": "Incorrect API key provided: sk-abc***xyz.",
            "type": "x",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    # What the answer says, not the retries (below): the upstream asks for none.
    head = {**headers, "x-should-retry": "false"}
    upstream = Upstream(lambda r: httpx.Response(status, headers=head, json=body))
    with pytest.raises(UpstreamHTTPError) as info:
        await run(provider_for(upstream))
    exc = info.value
    assert (exc.code, exc.retryable, exc.status, exc.retry_after_s) == (
        code,
        retryable,
        status,
        wait,
    )
    assert "sk-abc" not in str(exc)  # the upstream's message may echo the key
    assert len(upstream.requests) == 1


RETRIES = 2  # the lean client's MAX_RETRIES, which the SDK is given

# (status, headers, requests one call makes): what the lean client retries (SPEC §7).
RETRY_CASES: list[tuple[int, dict[str, str], int]] = [
    (408, {}, 1 + RETRIES),
    (409, {}, 1 + RETRIES),
    (429, {"retry-after-ms": "1"}, 1 + RETRIES),
    (429, {"retry-after": "0.001"}, 1 + RETRIES),
    (500, {}, 1 + RETRIES),
    (503, {}, 1 + RETRIES),
    (599, {}, 1 + RETRIES),
    (400, {}, 1),
    (401, {}, 1),
    (404, {}, 1),
    (422, {}, 1),
    (400, {"x-should-retry": "true"}, 1 + RETRIES),
    (503, {"x-should-retry": "false"}, 1),
]


@pytest.mark.parametrize(("status", "headers", "attempts"), RETRY_CASES)
async def test_sdk_retries_the_statuses_the_lean_client_retries(
    status: int, headers: dict[str, str], attempts: int
) -> None:
    upstream = Upstream(lambda r: httpx.Response(status, headers=headers, json={}))
    with pytest.raises(UpstreamHTTPError) as info:
        await run(provider_for(upstream))
    assert info.value.status == status
    assert len(upstream.requests) == attempts
    assert len({r.content for r in upstream.requests}) == 1  # the same request each time


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ReadTimeout("t"), UpstreamTimeout),
        (httpx.ConnectTimeout("t"), UpstreamTimeout),
        (httpx.PoolTimeout("t"), UpstreamTimeout),
        (httpx.ConnectError("refused"), UpstreamConnectionError),
        (httpx.RemoteProtocolError("bad"), UpstreamConnectionError),
    ],
)
async def test_transport_failure_before_answer(exc: Exception, cls: type[ProviderError]) -> None:
    upstream = Upstream(raising(exc))
    with pytest.raises(cls) as info:
        await run(provider_for(upstream))
    assert info.value.retryable
    # Retried, timeouts too: the SDK's rule (the lean client does not retry a timeout).
    assert len(upstream.requests) == 1 + RETRIES


@pytest.mark.parametrize(
    ("failure", "cls"),
    [
        (httpx.RemoteProtocolError("incomplete chunked read"), UpstreamConnectionError),
        (httpx.ReadError("reset"), UpstreamConnectionError),
        (httpx.ReadTimeout("t"), UpstreamTimeout),
    ],
)
async def test_transport_failure_mid_stream(failure: Exception, cls: type[ProviderError]) -> None:
    body = Body([*RECORDED[:3], failure])
    got: list[Delta] = []
    upstream = Upstream(sse_response(body))
    with pytest.raises(cls) as info:
        provider = provider_for(upstream)
        try:
            async for d in provider.stream(ask()):
                got.append(d)
        finally:
            await provider.aclose()
    assert [d.text for d in got] == ["Hel", "lo!"]
    assert info.value.retryable
    assert body.closed
    assert len(upstream.requests) == 1  # an answer that has begun is not retried


@pytest.mark.parametrize(
    "bad",
    [
        b'data: {"id": "x", "choices": [{"delta": {"content": "tr\n\n',
        b"data: \xff\xfe\n\n",
        chunk({"id": "x", "object": "chat.completion.chunk", "choices": "nonsense"}),
        chunk({"id": "x", "object": "chat.completion.chunk", "choices": ["nonsense"]}),
        chunk({"id": "x", "choices": [{"index": 0, "delta": {"content": 42}}]}),
        chunk({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": 7}]}),
        chunk({"id": "x", "choices": [], "usage": {"prompt_tokens": "many"}}),
    ],
)
async def test_malformed_chunk_is_protocol_error(bad: bytes) -> None:
    body = Body([RECORDED[0], bad, *RECORDED[1:]])
    with pytest.raises(UpstreamProtocolError) as info:
        await run(provider_for(Upstream(sse_response(body))))
    assert not info.value.retryable
    assert body.closed


async def test_error_event_in_stream_is_retryable_provider_error() -> None:
    body = Body([RECORDED[0], chunk({"error": {"message": "overloaded", "type": "server_error"}})])
    with pytest.raises(ProviderError) as info:
        await run(provider_for(Upstream(sse_response(body))))
    assert info.value.retryable
    assert "overloaded" not in info.value.message


async def test_generator_aclose_mid_stream_closes_the_response() -> None:
    body = Body(RECORDED, gate=asyncio.Event())
    provider = provider_for(Upstream(sse_response(body)))
    gen = provider.stream(ask())
    assert await anext(gen) == Delta(text="Hel")
    assert not body.closed
    await gen.aclose()
    assert body.closed
    await provider.aclose()


async def test_cancelling_the_consumer_closes_the_response_and_propagates() -> None:
    gate = asyncio.Event()  # never set: the body stalls after two chunks
    body = Body(RECORDED, gate=gate)
    provider = provider_for(Upstream(sse_response(body)))
    first = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(provider.stream(ask())) as gen:
            async for _ in gen:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert body.closed
    await provider.aclose()


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_registry_loads_the_provider(client: str | None) -> None:
    provider = load("openai", client=client, base_url=BASE_URL, api_key="k", default_model="m")
    try:
        assert type(provider) is CLIENTS[client]
        assert (provider.name, provider.default_model) == ("openai", "m")
    finally:
        await provider.aclose()


@pytest.mark.parametrize("client", ["sdk", "lean"])
async def test_configured_providers_use_the_chosen_client(client: str) -> None:
    """``--openai-client`` picks the class; the provider stays "openai"."""
    config = Config(provider="openai", openai_base_url=BASE_URL, openai_client=client)
    providers = configured_providers(config, {"OPENAI_API_KEY": "sk-env"})
    try:
        provider = providers["openai"]
        assert type(provider) is CLIENTS[client]
        assert isinstance(providers["synthetic"], SyntheticProvider)
        assert isinstance(provider, OpenAIProvider | LeanOpenAIProvider)
        assert (provider.name, provider.default_model, provider.models) == (
            "openai",
            "gpt-4o-mini",
            ("gpt-4o-mini",),
        )
        assert (provider.api_key, provider.timeout_s) == ("sk-env", 30.0)
    finally:
        for p in providers.values():
            await p.aclose()


def test_retry_after_forms() -> None:
    assert retry_after({}) is None
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "0.5"}) == 0.5
    assert retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({"retry-after": "-1"}) is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after({"retry-after": later})
    assert wait is not None and 28 <= wait <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after({"retry-after": past}) == 0.0


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(model=None, messages=(Message("tool", "x"),)),
        ask(temperature=2.5),
        ask(temperature=-0.1),
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


@pytest.mark.parametrize("client", ["sdk", "lean"])
async def test_models_offered(client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cls = CLIENTS[client]
    official = cls(api_key="k")
    compatible = cls(base_url=BASE_URL, api_key="k", default_model="llama3")
    try:
        assert official.models[0] == "gpt-4o-mini" and len(official.models) > 1
        assert compatible.models == ("llama3",)  # another server's names are unknown
    finally:
        await official.aclose()
        await compatible.aclose()

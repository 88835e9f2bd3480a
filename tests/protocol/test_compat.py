"""Drop-in compatibility (SPEC §6): the official ``openai`` SDK pointed at sseserver's
``/v1/chat/completions`` (stream and not, usage, errors as the SDK's own exception types),
and ``/v1/chat`` speaking the Vercel AI SDK UI message stream protocol (v1) to a
``useChat``-style request. The synthetic provider answers, so the text is known."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import openai
import pytest
from openai import AsyncOpenAI

from sseserver.config import parse_rate
from sseserver.http.server import Server
from tests.support.servers import running_server
from tests.support.sse_parser import SSEParser
from tests.support.synthetic import expected_text

pytestmark = pytest.mark.timeout(60)

SECRET = "compat-test-secret-long-enough-for-hs256!!"
FAST = {"sseserver": {"tokens": 5, "interval_ms": 1}}
MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say five words"},
]


@asynccontextmanager
async def sdk(api_key: str = "x", **overrides: Any) -> AsyncIterator[tuple[AsyncOpenAI, Server]]:
    async with running_server(**overrides) as server:
        client = AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key, max_retries=0
        )
        try:
            yield client, server
        finally:
            await client.close()


# --------------------------------------------------------------------------------------
# OpenAI SDK: streaming
# --------------------------------------------------------------------------------------


async def test_openai_sdk_streams_deltas_finish_and_usage() -> None:
    async with sdk() as (client, _server):
        stream = await client.chat.completions.create(
            model="synthetic-1",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FAST,
        )
        chunks = [chunk async for chunk in stream]
    assert chunks, "no chunks"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"synthetic-1"}

    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == expected_text(5)
    content_chunks = [c for c in with_choices if c.choices[0].delta.content]
    assert len(content_chunks) == 5  # one chunk per token: streamed, not buffered
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == "stop"
    assert all(f is None for f in finishes[:-1])

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.prompt_tokens >= 1
    assert usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )


async def test_openai_sdk_stream_without_usage() -> None:
    async with sdk() as (client, _server):
        stream = await client.chat.completions.create(
            model="synthetic-1", messages=MESSAGES, stream=True, extra_body=FAST
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_sdk_stream_raw_wire_ends_with_done() -> None:
    """What the SDK hides: SSE framing, ``data: [DONE]`` last, and the stream headers."""
    async with running_server() as server:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "synthetic-1", "messages": MESSAGES, "stream": True, **FAST},
            ) as resp,
        ):
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-cache, no-transform"
            assert resp.headers["x-accel-buffering"] == "no"
            parser = SSEParser()
            async for chunk in resp.aiter_bytes():
                parser.feed(chunk)
    data = [e.data for e in parser.events]
    assert data[-1] == "[DONE]"
    assert all(e.type == "message" for e in parser.events)
    for item in data[:-1]:
        assert json.loads(item)["object"] == "chat.completion.chunk"


async def test_openai_sdk_provider_prefixed_model() -> None:
    async with sdk() as (client, _server):
        stream = await client.chat.completions.create(
            model="synthetic/synthetic-1", messages=MESSAGES, stream=True, extra_body=FAST
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == expected_text(5)


# --------------------------------------------------------------------------------------
# OpenAI SDK: whole answers
# --------------------------------------------------------------------------------------


async def test_openai_sdk_non_streaming() -> None:
    async with sdk() as (client, _server):
        completion = await client.chat.completions.create(
            model="synthetic-1", messages=MESSAGES, stream=False, extra_body=FAST
        )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "synthetic-1"
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(5)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5


async def test_openai_sdk_several_calls_on_one_client() -> None:
    """The SDK reuses its HTTP connections (keep-alive) across calls."""
    async with sdk() as (client, _server):
        for tokens in (1, 2, 3):
            completion = await client.chat.completions.create(
                model="synthetic-1",
                messages=MESSAGES,
                extra_body={"sseserver": {"tokens": tokens, "interval_ms": 0}},
            )
            assert completion.choices[0].message.content == expected_text(tokens)
            stream = await client.chat.completions.create(
                model="synthetic-1",
                messages=MESSAGES,
                stream=True,
                extra_body={"sseserver": {"tokens": tokens, "interval_ms": 0}},
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            assert text == expected_text(tokens)


async def test_openai_sdk_content_parts() -> None:
    async with sdk() as (client, _server):
        completion = await client.chat.completions.create(
            model="synthetic-1",
            messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            extra_body=FAST,
        )
    assert completion.choices[0].message.content == expected_text(5)


# --------------------------------------------------------------------------------------
# OpenAI SDK: errors surface as the SDK's exception types
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "extra"),
    [
        ([{"role": "robot", "content": "x"}], FAST),
        ([], FAST),
        ([{"role": "user"}], FAST),
        (MESSAGES, {"sseserver": {"tokens": -1}}),
        (MESSAGES, {"sseserver": {"interval_ms": "soon"}}),
        (MESSAGES, {"provider": "no-such-provider"}),
        (MESSAGES, {"temperature": 9}),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_bad_request(
    messages: list[Any], extra: dict[str, Any], stream: bool
) -> None:
    async with sdk() as (client, _server):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="synthetic-1", messages=messages, stream=stream, extra_body=extra
            )
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    assert body.get("code") == "bad_request" or body.get("error", {}).get("code") == "bad_request"


async def test_openai_sdk_with_jwt_as_api_key() -> None:
    token = jwt.encode({"sub": "sdk-user"}, SECRET, algorithm="HS256")
    async with sdk(api_key=token, jwt_secret=SECRET) as (client, _server):
        completion = await client.chat.completions.create(
            model="synthetic-1", messages=MESSAGES, extra_body=FAST
        )
        assert completion.choices[0].message.content == expected_text(5)
    async with sdk(api_key="not-a-jwt", jwt_secret=SECRET) as (client, _server):
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(
                model="synthetic-1", messages=MESSAGES, extra_body=FAST
            )
        assert info.value.status_code == 401


async def test_openai_sdk_rate_limited() -> None:
    async with sdk(rate=parse_rate("1/60s")) as (client, _server):
        await client.chat.completions.create(
            model="synthetic-1", messages=MESSAGES, extra_body=FAST
        )
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(
                model="synthetic-1", messages=MESSAGES, extra_body=FAST
            )
        assert info.value.status_code == 429
        assert info.value.response.headers.get("retry-after", "").isdigit()


# --------------------------------------------------------------------------------------
# Vercel AI SDK UI message stream (v1) on /v1/chat
# --------------------------------------------------------------------------------------


def use_chat_body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    """What ``useChat`` (AI SDK 5) posts: an id, UIMessages with ``parts``, a trigger."""
    return {
        "id": "chat-1",
        "messages": [
            {"id": "m0", "role": "system", "parts": [{"type": "text", "text": "be brief"}]},
            {
                "id": "m1",
                "role": "user",
                "parts": [
                    {"type": "text", "text": text},
                    {"type": "file", "mediaType": "image/png", "url": "data:,"},
                ],
            },
        ],
        "trigger": "submit-message",
        **extra,
    }


async def _ui_stream(port: int, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    parser = SSEParser()
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
        http.stream("POST", "/v1/chat", json=body) as resp,
    ):
        async for chunk in resp.aiter_bytes():
            parser.feed(chunk)
    parts: list[Any] = []
    for event in parser.events:
        assert event.type == "message", event
        parts.append(event.data if event.data == "[DONE]" else json.loads(event.data))
    return resp, parts


# The AI SDK parses every part with a strict zod object (vercel/ai
# packages/ai/src/ui-message-stream/ui-message-chunks.ts): an unknown key fails the parse.
UI_PART_KEYS = {
    "start": {"type", "messageId", "messageMetadata"},
    "start-step": {"type"},
    "text-start": {"type", "id", "providerMetadata"},
    "text-delta": {"type", "id", "delta", "providerMetadata"},
    "text-end": {"type", "id", "providerMetadata"},
    "finish-step": {"type"},
    "finish": {"type", "finishReason", "messageMetadata"},
    "error": {"type", "errorText"},
}
FINISH_REASONS = {"stop", "length", "content-filter", "tool-calls", "error", "other"}


def assert_ui_message_stream(parts: list[Any], tokens: int) -> None:
    assert parts[-1] == "[DONE]"
    for part in parts[:-1]:
        assert isinstance(part, dict) and part.get("type") in UI_PART_KEYS, part
        assert set(part) <= UI_PART_KEYS[part["type"]], part
    types = [p["type"] for p in parts[:-1]]
    assert types == [
        "start",
        "start-step",
        "text-start",
        *["text-delta"] * tokens,
        "text-end",
        "finish-step",
        "finish",
    ], types
    start = parts[0]
    assert isinstance(start.get("messageId"), str) and start["messageId"]
    text_id = parts[2]["id"]
    assert isinstance(text_id, str) and text_id
    deltas = [p for p in parts[:-1] if p["type"] == "text-delta"]
    assert all(p["id"] == text_id for p in deltas)
    assert "".join(p["delta"] for p in deltas) == expected_text(tokens)
    assert parts[-4]["id"] == text_id  # text-end
    assert parts[-2].get("finishReason", "stop") in FINISH_REASONS


async def test_vercel_ui_message_stream() -> None:
    async with running_server() as server:
        body = use_chat_body(params={"tokens": 5, "interval_ms": 1})
        resp, parts = await _ui_stream(server.port, body)
    assert resp.status_code == 200
    assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-accel-buffering"] == "no"
    assert_ui_message_stream(parts, 5)


async def test_vercel_plain_use_chat_body() -> None:
    """Exactly what useChat sends, nothing of ours: the default synthetic answer."""
    async with running_server() as server:
        resp, parts = await _ui_stream(server.port, use_chat_body())
    assert resp.status_code == 200
    assert_ui_message_stream(parts, 32)


async def test_vercel_content_messages_accepted() -> None:
    async with running_server() as server:
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "params": {"tokens": 3, "interval_ms": 0},
        }
        resp, parts = await _ui_stream(server.port, body)
    assert resp.status_code == 200
    assert_ui_message_stream(parts, 3)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [1]},
        {"messages": [{"role": "robot", "parts": [{"type": "text", "text": "x"}]}]},
        {"messages": [{"role": "user", "parts": []}], "params": {"tokens": -3}},
    ],
)
async def test_vercel_bad_body_400(body: dict[str, Any]) -> None:
    async with (
        running_server() as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
    ):
        resp = await http.post("/v1/chat", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == "bad_request"


def _sample(metrics_text: str, name: str) -> float:
    """The value of one exposition line (``name`` includes its labels)."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_compat_streams_are_counted_and_logged() -> None:
    """/v1/chat and /v1/chat/completions are not generations, but they count alike."""
    async with sdk() as (client, server):
        _, parts = await _ui_stream(server.port, use_chat_body(params={"tokens": 4}))
        assert parts[-1] == "[DONE]"
        chunks = await client.chat.completions.create(
            model="synthetic-1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"sseserver": {"tokens": 3, "interval_ms": 0}},
        )
        async for _ in chunks:
            pass
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text
    assert _sample(text, 'sseserver_tokens_total{provider="synthetic"}') == 7, text
    complete = 'sseserver_generations_total{outcome="complete",provider="synthetic"}'
    assert _sample(text, complete) == 2, text
    assert _sample(text, 'sseserver_ttft_seconds_count{provider="synthetic"}') == 2, text

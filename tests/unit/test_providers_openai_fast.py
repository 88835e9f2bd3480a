"""``--openai-client fast`` against the SDK, without sockets: the same bytes replayed to both
clients through ``httpx.MockTransport`` must give the same deltas and the same errors.

- ``EventDecoder`` against the SDK's own ``openai._streaming.SSEDecoder`` as the oracle, over
  arbitrary bytes cut at arbitrary places (hypothesis).
- Whole answers: odd framing, odd JSON and odd error answers, each replayed to both clients.
- The composition root: ``configured_providers`` picks the class ``--openai-client`` names.

(Every test of tests/unit/test_providers_openai.py runs for both clients as well, and
tests/protocol/test_providers_wire.py compares them against the fake upstream's sockets.)
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from sseserver.config import Config
from sseserver.providers.base import Delta, ProviderError
from sseserver.providers.openai import OpenAIProvider
from sseserver.providers.openai_fast import FastOpenAIProvider
from sseserver.providers.synthetic import SyntheticProvider
from sseserver.web.context import configured_providers
from sseserver.wire.sse_decode import EventDecoder
from tests.support.mock_transport import (
    Body,
    Upstream,
    ask,
    no_sockets,  # noqa: F401  (autouse: no test here opens a socket)
)
from tests.unit.test_providers_openai import BASE_URL, RECORDED, AnyOpenAI, ClientClass, chunk

# --------------------------------------------------------------------------------------
# EventDecoder == the SDK's SSEDecoder
# --------------------------------------------------------------------------------------

Decoded = tuple[list[tuple[str | None, str]], bool]  # (events, raised UnicodeDecodeError)


def cut(payload: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c % (len(payload) + 1) for c in cuts} | {0, len(payload)})
    return [payload[a:b] for a, b in itertools.pairwise(points)]


def sdk_decode(pieces: list[bytes]) -> Decoded:
    events: list[tuple[str | None, str]] = []
    try:
        for sse in SSEDecoder().iter_bytes(iter(pieces)):
            events.append((sse.event, sse.data))
    except UnicodeDecodeError:
        return events, True
    return events, False


def fast_decode(pieces: list[bytes]) -> Decoded:
    decoder = EventDecoder()
    events: list[tuple[str | None, str]] = []
    try:
        for piece in pieces:
            events.extend(decoder.feed(piece))
        decoder.close()
    except UnicodeDecodeError:
        return events, True
    return events, False


LINES = st.sampled_from(
    [
        b"data: {}",
        b"data:x",
        b"data",
        b"data: [DONE]",
        b"event: thread.run",
        b"event:",
        b"id: 7",
        b"id: a\x00b",
        b"retry: 10",
        b"retry: soon",
        b": keep-alive",
        b":",
        b"",
        b"other: field",
        b"data: caf\xc3\xa9",
        b"data: \xff",
        b": \xfe",
    ]
)
ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(
    lines=st.lists(st.tuples(LINES, ENDS), max_size=12),
    tail=st.binary(max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
@example(lines=[(b"data: a", b"\r\n"), (b"", b"\r\n")], tail=b"", cuts=[8])  # CR|LF split
@example(lines=[(b"data: a", b"\r"), (b"", b"\r")], tail=b"\n", cuts=[8])  # CR then LF alone
@example(lines=[(b"id: 1", b"\n"), (b"", b"\n"), (b"", b"\n")], tail=b"", cuts=[])
@example(lines=[(b"data: ok", b"\n"), (b"", b"\n")], tail=b"\xff", cuts=[])  # bad last line
def test_event_decoder_matches_the_sdk(
    lines: list[tuple[bytes, bytes]], tail: bytes, cuts: list[int]
) -> None:
    payload = b"".join(line + end for line, end in lines) + tail
    pieces = cut(payload, cuts)
    assert fast_decode(pieces) == sdk_decode(pieces)


@given(payload=st.binary(max_size=64), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_event_decoder_matches_the_sdk_on_any_bytes(payload: bytes, cuts: list[int]) -> None:
    pieces = cut(payload, cuts)
    assert fast_decode(pieces) == sdk_decode(pieces)


def test_event_decoder_stops_decoding_where_its_consumer_stops() -> None:
    # The SDK decodes a line only when the events before it were taken: a bad line after
    # [DONE] in the same read is never seen. So is it here.
    decoder = EventDecoder()
    events = decoder.feed(b"data: [DONE]\n\ndata: \xff\n\n")
    assert next(events) == (None, "[DONE]")


# --------------------------------------------------------------------------------------
# Whole answers replayed to both clients
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    deltas: list[Delta]
    error: tuple[type[ProviderError], str, str, bool, int | None, float | None] | None
    closed: bool  # the response was closed (its connection released)


def respond(
    chunks: Iterable[bytes | Exception], status: int = 200, headers: dict[str, str] | None = None
) -> Upstream:
    """An upstream answering with ``chunks`` (a fresh ``Body`` per request)."""
    bodies: list[Body] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(Body(chunks))
        head = {"content-type": "text/event-stream", **(headers or {})}
        return httpx.Response(status, headers=head, stream=bodies[-1])

    upstream = Upstream(answer)
    upstream.bodies = bodies  # type: ignore[attr-defined]
    return upstream


async def replay(client_cls: ClientClass, upstream: Upstream) -> Outcome:
    provider: AnyOpenAI = client_cls(
        base_url=BASE_URL, api_key="k", transport=httpx.MockTransport(upstream)
    )
    deltas: list[Delta] = []
    error = None
    try:
        async for d in provider.stream(ask()):
            deltas.append(d)
    except ProviderError as exc:
        error = (type(exc), exc.code, exc.message, exc.retryable, exc.status, exc.retry_after_s)
    finally:
        await provider.aclose()
    bodies: list[Body] = upstream.bodies  # type: ignore[attr-defined]
    return Outcome(deltas, error, all(b.closed for b in bodies))


async def both(chunks: list[bytes | Exception], **kw: Any) -> tuple[Outcome, Outcome]:
    return (
        await replay(OpenAIProvider, respond(chunks, **kw)),
        await replay(FastOpenAIProvider, respond(chunks, **kw)),
    )


def choice(**fields: Any) -> bytes:
    return chunk({"id": "c", "object": "chat.completion.chunk", "choices": [fields]})


def with_ends(chunks: list[bytes], end: bytes) -> list[bytes]:
    return [c.replace(b"\n", end) for c in chunks]


HEAD, TOKENS, FINISH, USAGE, DONE = (
    RECORDED[0],
    RECORDED[1:3],
    RECORDED[3],
    RECORDED[4],
    RECORDED[5],
)
ANSWER = [HEAD, *TOKENS, FINISH, USAGE, DONE]


def around(*middle: bytes) -> list[bytes | Exception]:
    """A whole answer with ``middle`` between its first token and the rest."""
    return [HEAD, TOKENS[0], *middle, TOKENS[1], FINISH, USAGE, DONE]


STREAMS: dict[str, list[bytes | Exception]] = {
    "recorded": list(ANSWER),
    "one-read": [b"".join(ANSWER)],
    "byte-by-byte": [bytes([b]) for b in b"".join(ANSWER)],
    "crlf": list(with_ends(ANSWER, b"\r\n")),
    "cr": list(with_ends(ANSWER, b"\r")),
    "crlf-split": [piece for c in with_ends(ANSWER, b"\r\n") for piece in (c[:-1], c[-1:])],
    "comments-and-fields": around(
        b": keep-alive\n\n", b"retry: 100\n", b"event: message\n", TOKENS[0], b"id: 3\n"
    ),
    "id-then-blank-line": around(b"id: 3\n\n"),
    "multi-line-data": around(
        b'data: {"choices":\ndata: [{"index":0,"delta":{"content":"x"}}]}\n\n'
    ),
    "data-without-space": around(b'data:{"choices":[{"index":0,"delta":{"content":"y"}}]}\n\n'),
    "event-without-data": around(b"event: ping\n\n"),
    "empty-data": around(b"data:\n\n"),
    "assistants-event": around(b'event: thread.run.created\ndata: {"id": "run"}\n\n'),
    "assistants-event-not-json": around(b"event: thread.run.created\ndata: nope\n\n"),
    "after-done-ignored": [*ANSWER[:-1], DONE + b"data: {oops\n\ndata: \xff\n\n"],
    "done-with-suffix": [*ANSWER[:-1], b"data: [DONE] and more\n\n"],
    "no-done": [*ANSWER[:-1]],
    "no-done-bad-tail": [*ANSWER[:-1], b"\xff"],
    "no-done-tail": [*ANSWER[:-1], b"data: partial"],
    "bad-utf8-comment": [HEAD, TOKENS[0] + b": \xff\n\n" + TOKENS[1], FINISH, USAGE, DONE],
    "bad-utf8-data": around(b"data: \xc3(\n\n"),
    "not-json": around(b"data: {nope\n\n"),
    "json-list": around(b"data: [1, 2]\n\n"),
    "json-string": around(b'data: "text"\n\n'),
    "json-null": around(b"data: null\n\n"),
    "json-number": around(b"data: 5\n\n"),
    "choices-empty-object": around(chunk({"choices": {}})),
    "choices-object": around(chunk({"choices": {"a": 1}})),
    "choices-string": around(chunk({"choices": "nonsense"})),
    "choice-null": around(chunk({"choices": [None]})),
    "choice-empty": around(chunk({"choices": [{}]})),
    "index-string": around(choice(index="0", delta={"content": "s"})),
    "index-float": around(choice(index=0.0, delta={"content": "f"})),
    "index-false": around(choice(index=False, delta={"content": "b"})),
    "index-one": around(choice(index=1, delta={"content": "other choice"})),
    "delta-string": around(choice(index=0, delta="abc")),
    "delta-null": around(choice(index=0, delta=None, finish_reason="stop")),
    "content-list": around(choice(index=0, delta={"content": ["a"]})),
    "content-number": around(choice(index=0, delta={"content": 42})),
    "finish-empty": [HEAD, *TOKENS, choice(index=0, delta={}, finish_reason=""), DONE],
    "finish-number": around(choice(index=0, delta={}, finish_reason=7)),
    "finish-then-more": [HEAD, TOKENS[0], FINISH, TOKENS[1], USAGE, DONE],
    "usage-number": [*ANSWER[:4], chunk({"choices": [], "usage": 5}), DONE],
    "usage-empty": [*ANSWER[:4], chunk({"choices": [], "usage": {}}), DONE],
    "usage-bools": [*ANSWER[:4], chunk({"choices": [], "usage": {"prompt_tokens": True}}), DONE],
    "usage-string": [*ANSWER[:4], chunk({"choices": [], "usage": {"total_tokens": "9"}}), DONE],
    "usage-float": [*ANSWER[:4], chunk({"choices": [], "usage": {"total_tokens": 9.0}}), DONE],
    "error-event": around(chunk({"error": {"message": "overloaded"}})),
    "error-string": around(chunk({"error": "boom"})),
    "error-null": around(chunk({"error": None})),
    "error-empty": around(chunk({"error": ""})),
    "drop": [HEAD, TOKENS[0], httpx.RemoteProtocolError("incomplete chunked read")],
    "reset": [HEAD, httpx.ReadError("connection reset")],
    "stall": [HEAD, TOKENS[0], httpx.ReadTimeout("t")],
    "bad-gzip": [HEAD, httpx.DecodingError("bad")],
}


@pytest.mark.parametrize("name", list(STREAMS))
async def test_clients_read_the_same_stream_alike(name: str) -> None:
    sdk, fast = await both(STREAMS[name])
    assert fast == sdk
    assert sdk.closed


async def test_gzip_encoded_stream_reads_alike() -> None:
    sdk, fast = await both([gzip.compress(b"".join(ANSWER))], headers={"content-encoding": "gzip"})
    assert fast == sdk
    assert sdk.deltas[-1].finish_reason == "stop"


# (status, body chunks, headers)
ERROR_ANSWERS: dict[str, tuple[int, list[bytes | Exception], dict[str, str]]] = {
    "code": (401, [json.dumps({"error": {"code": "invalid_api_key"}}).encode()], {}),
    "numeric-code": (400, [json.dumps({"error": {"code": 42, "message": "m"}}).encode()], {}),
    "top-level-code": (403, [json.dumps({"code": "top"}).encode()], {}),
    "error-string": (500, [json.dumps({"error": "broken"}).encode()], {}),
    "list-body": (500, [b"[1, 2]"], {}),
    "html-body": (502, [b"<html>Bad Gateway</html>"], {"content-type": "text/html"}),
    "empty-body": (503, [], {"retry-after": "3"}),
    "retry-after-ms": (429, [b"{}"], {"retry-after-ms": "250", "retry-after": "9"}),
    "retry-after-garbage": (429, [b"{}"], {"retry-after": "soon"}),
    "no-redirect-location": (302, [b""], {}),
    "body-timeout": (500, [b'{"err', httpx.ReadTimeout("t")], {}),
    "body-reset": (500, [b'{"err', httpx.ReadError("reset")], {}),
}


@pytest.mark.parametrize("name", list(ERROR_ANSWERS))
async def test_clients_read_the_same_error_answer_alike(name: str) -> None:
    status, chunks, headers = ERROR_ANSWERS[name]
    sdk, fast = await both(chunks, status=status, headers=headers)
    assert sdk.error is not None
    assert (fast.deltas, fast.error) == (sdk.deltas, sdk.error)
    # The SDK leaves an error answer whose body failed unclosed (httpcore closes a real
    # connection on the failed read anyway); the fast client closes every response.
    assert fast.closed


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=12), end=st.sampled_from(["\n", "\r\n"]))
def test_any_cutting_of_an_answer_reads_alike(cuts: list[int], end: str) -> None:
    payload = b"".join(with_ends(ANSWER, end.encode()))
    pieces: list[bytes | Exception] = list(cut(payload, cuts))
    sdk, fast = asyncio.run(both(pieces))
    assert fast == sdk
    assert fast.deltas[-1].finish_reason == "stop"


async def test_fast_client_sends_what_the_sdk_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-1")
    sent: dict[str, httpx.Request] = {}
    for name, cls in (("sdk", OpenAIProvider), ("fast", FastOpenAIProvider)):
        upstream = respond(ANSWER)
        await replay(cls, upstream)
        sent[name] = upstream.requests[-1]
    sdk, fast = sent["sdk"], sent["fast"]
    assert (fast.method, fast.url) == (sdk.method, sdk.url)
    assert json.loads(fast.content) == json.loads(sdk.content)
    for header in ("authorization", "accept", "content-type", "openai-organization"):
        assert fast.headers[header] == sdk.headers[header], header
    assert fast.headers["openai-project"] == sdk.headers["openai-project"] == "proj-1"


# --------------------------------------------------------------------------------------
# --openai-client picks the class; the provider stays "openai"
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "cls"), [("sdk", OpenAIProvider), ("fast", FastOpenAIProvider)])
async def test_configured_providers_use_the_chosen_client(
    client: str, cls: type[AnyOpenAI]
) -> None:
    config = Config(provider="openai", openai_base_url=BASE_URL, openai_client=client)
    providers = configured_providers(config, {"OPENAI_API_KEY": "sk-env"})
    try:
        provider = providers["openai"]
        assert type(provider) is cls
        assert isinstance(providers["synthetic"], SyntheticProvider)
        assert (provider.name, provider.default_model, provider.models) == (
            "openai",
            "gpt-4o-mini",
            ("gpt-4o-mini",),
        )
        assert isinstance(provider, OpenAIProvider | FastOpenAIProvider)
        assert (provider.api_key, provider.timeout_s) == ("sk-env", 30.0)
    finally:
        for p in providers.values():
            await p.aclose()

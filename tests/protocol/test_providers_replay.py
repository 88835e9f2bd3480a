"""The same bytes replayed to both OpenAI clients (``--openai-client sdk`` and ``lean``) over
a loopback socket must give the same deltas and the same errors (SPEC §7).

A streamed answer in odd framing (CR, CRLF, a line split across reads, comments, fields the
API never sends), odd JSON, and error answers of odd shapes, each written as it is by an
upstream that answers every request with one prepared answer, chunk by chunk, then faults
(a dropped or reset connection, a stall) where the answer says. The SDK reads it through
httpx and its own ``SSEDecoder``; the lean client through its own connection and
``openai_wire.ChatEvents``. (The fakes of tests/upstreams speak the API as it should be
spoken; this is what a buggy OpenAI-compatible server may send. How events are cut into
network reads is tests/unit/test_sse_decode.py's subject.)

Error answers say ``x-should-retry: false``: what is compared is how each client reads
them; retries are tests/protocol/test_providers_wire.py's subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gzip
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sseserver.providers.base import Delta, ProviderError
from sseserver.providers.openai import OpenAIProvider
from sseserver.providers.openai_lean import LeanOpenAIProvider
from tests.support.mock_transport import ask
from tests.unit.test_providers_openai import RECORDED, chunk

TIMEOUT_S = 0.3  # the clients' upstream timeout: what a stall costs
READ_GAP_S = 0.001  # between the chunks of an answer, so that most arrive in reads of their own
RESET_AFTER_S = 0.02  # what the client is given to read what came before a reset


class Fault(enum.Enum):
    """What the upstream does instead of writing the rest of the answer."""

    DROP = "drop"  # close the connection without the chunked terminator
    RESET = "reset"  # close it with a TCP reset
    STALL = "stall"  # write nothing more, keep the connection open


Piece = bytes | Fault


@dataclass
class Answer:
    pieces: list[Piece]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class ReplayUpstream:
    """Answers every request on 127.0.0.1 with ``answer``, a chunk per piece."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []  # the bodies received
        self.heads: list[dict[str, str]] = []  # their heads: the request line as "_target"
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ReplayUpstream:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; False when the connection must end."""
        request_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        fields = [line.partition(":") for line in lines if line]
        head = {name.strip().lower(): value.strip() for name, _, value in fields}
        self.heads.append({"_target": request_line, **head})
        self.requests.append(await reader.readexactly(int(head.get("content-length", "0"))))
        answer = self.answer
        headers = {"content-type": "text/event-stream", **answer.headers}
        if answer.status >= 400:
            headers["x-should-retry"] = "false"
        lines = [f"HTTP/1.1 {answer.status} X", "transfer-encoding: chunked"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        for piece in answer.pieces:
            if isinstance(piece, Fault):
                await self._fault(piece, reader, writer)
                return False
            if piece:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(READ_GAP_S)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _fault(
        self, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await writer.drain()
        if fault is Fault.STALL:
            await reader.read()  # until the client gives up and closes
        elif fault is Fault.RESET:
            # A reset discards what the client has not read yet: let it read first.
            await asyncio.sleep(RESET_AFTER_S)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


@dataclass(frozen=True, slots=True)
class Outcome:
    deltas: list[Delta]
    error: tuple[type[ProviderError], str, str, bool, int | None, float | None] | None
    requests: int


Client = Callable[..., OpenAIProvider | LeanOpenAIProvider]


async def replay(client: Client, answer: Answer) -> Outcome:
    async with ReplayUpstream(answer) as up:
        provider = client(base_url=up.base_url, api_key="k", timeout_s=TIMEOUT_S)
        deltas: list[Delta] = []
        error = None
        try:
            async with contextlib.aclosing(provider.stream(ask())) as stream:
                async for d in stream:
                    deltas.append(d)
        except ProviderError as exc:
            error = (type(exc), exc.code, exc.message, exc.retryable, exc.status, exc.retry_after_s)
        finally:
            await provider.aclose()
        return Outcome(deltas, error, len(up.requests))


async def both(answer: Answer) -> tuple[Outcome, Outcome]:
    return await replay(OpenAIProvider, answer), await replay(LeanOpenAIProvider, answer)


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


def around(*middle: bytes) -> list[Piece]:
    """A whole answer with ``middle`` between its first token and the rest."""
    return [HEAD, TOKENS[0], *middle, TOKENS[1], FINISH, USAGE, DONE]


STREAMS: dict[str, list[Piece]] = {
    "recorded": list(ANSWER),
    "one-read": [b"".join(ANSWER)],
    "byte-by-byte": [*(bytes([b]) for b in b"".join(ANSWER[:3])), *ANSWER[3:]],
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
    "drop": [HEAD, TOKENS[0], Fault.DROP],
    "reset": [HEAD, Fault.RESET],
    "stall": [HEAD, TOKENS[0], Fault.STALL],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(STREAMS))
async def test_clients_read_the_same_stream_alike(name: str) -> None:
    sdk, lean = await both(Answer(STREAMS[name]))
    assert lean == sdk
    assert sdk.requests == 1


@pytest.mark.timeout(60)
async def test_gzip_encoded_stream_reads_alike() -> None:
    answer = Answer([gzip.compress(b"".join(ANSWER))], headers={"content-encoding": "gzip"})
    sdk, lean = await both(answer)
    assert lean == sdk
    assert sdk.deltas[-1].finish_reason == "stop"


@pytest.mark.timeout(60)
async def test_body_that_does_not_decompress_fails_alike() -> None:
    sdk, lean = await both(Answer(list(ANSWER), headers={"content-encoding": "gzip"}))
    assert sdk.error is not None
    assert lean == sdk


# (status, body pieces, headers)
ERROR_ANSWERS: dict[str, tuple[int, list[Piece], dict[str, str]]] = {
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
    "body-stall": (500, [b'{"err', Fault.STALL], {}),
    "body-reset": (500, [b'{"err', Fault.RESET], {}),
}


# Answers the two clients are known to read differently (none now).
DIVERGING: dict[str, str] = {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=DIVERGING[name]))
        if name in DIVERGING
        else name
        for name in ERROR_ANSWERS
    ],
)
async def test_clients_read_the_same_error_answer_alike(name: str) -> None:
    status, pieces, headers = ERROR_ANSWERS[name]
    sdk, lean = await both(Answer(pieces, status, headers))
    assert sdk.error is not None
    assert lean == sdk


@pytest.mark.timeout(60)
async def test_clients_send_the_same_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-1")
    sent: list[tuple[bytes, dict[str, str]]] = []
    for client in (OpenAIProvider, LeanOpenAIProvider):
        async with ReplayUpstream(Answer(list(ANSWER))) as up:
            provider = client(base_url=up.base_url, api_key="k", timeout_s=TIMEOUT_S)
            try:
                assert [d async for d in provider.stream(ask())][-1].finish_reason == "stop"
            finally:
                await provider.aclose()
            sent.append((up.requests[-1], up.heads[-1]))
    (sdk_body, sdk), (lean_body, lean) = sent
    assert json.loads(lean_body) == json.loads(sdk_body)
    assert lean["_target"] == sdk["_target"] == "POST /v1/chat/completions HTTP/1.1"
    for header in ("authorization", "accept", "content-type", "openai-organization"):
        assert lean[header] == sdk[header], header
    assert lean["openai-project"] == sdk["openai-project"] == "proj-1"

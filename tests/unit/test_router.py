"""sseserver.web.app: the router (exact paths, ``{name}`` segments, 404) and the application's
answers for a known path with the wrong method (405 with ``Allow``, incl. HEAD/OPTIONS),
OPTIONS (204 with ``Allow``) and HEAD (served by the GET handler). No sockets: the
response is captured by a fake connection channel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sseserver.http.flow import FlowControl
from sseserver.http.heartbeat import StreamRegistry
from sseserver.http.request import HeaderList, Request
from sseserver.http.stream import EventStream
from sseserver.web.app import Application, Router
from sseserver.wire.errors import HTTPError


async def _handler_a(request: Request, stream: EventStream) -> None:
    stream.respond(200, b"a")


async def _handler_b(request: Request, stream: EventStream) -> None:
    stream.respond(200, b"b")


def _allow(value: str) -> set[str]:
    return {m.strip() for m in value.split(",") if m.strip()}


# --------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------


def test_exact_route() -> None:
    router = Router()
    router.add(["GET"], "/healthz", _handler_a)
    handler, params, allow = router.resolve("GET", "/healthz")
    assert handler is _handler_a
    assert params == {}
    assert _allow(allow) == {"GET", "HEAD", "OPTIONS"}


def test_methods_are_case_insensitive_on_registration() -> None:
    router = Router()
    router.add(["get", "post"], "/x", _handler_a)
    assert router.resolve("GET", "/x")[0] is _handler_a
    assert router.resolve("POST", "/x")[0] is _handler_a


def test_two_registrations_of_one_path_merge_methods() -> None:
    router = Router()
    router.add(["GET"], "/v1/stream", _handler_a)
    router.add(["POST"], "/v1/stream", _handler_b)
    assert router.resolve("GET", "/v1/stream")[0] is _handler_a
    assert router.resolve("POST", "/v1/stream")[0] is _handler_b
    assert _allow(router.resolve("GET", "/v1/stream")[2]) == {"GET", "HEAD", "OPTIONS", "POST"}


def test_pattern_route_captures_one_segment() -> None:
    router = Router()
    router.add(["GET"], "/v1/streams/{id}", _handler_a)
    router.add(["POST"], "/v1/streams/{id}/cancel", _handler_b)
    handler, params, _ = router.resolve("GET", "/v1/streams/abc-123")
    assert handler is _handler_a and params == {"id": "abc-123"}
    handler, params, allow = router.resolve("POST", "/v1/streams/xyz/cancel")
    assert handler is _handler_b and params == {"id": "xyz"}
    assert _allow(allow) == {"POST", "OPTIONS"}


def test_same_pattern_twice_merges_methods() -> None:
    router = Router()
    router.add(["GET"], "/items/{id}", _handler_a)
    router.add(["POST"], "/items/{id}", _handler_b)
    assert router.resolve("POST", "/items/1") == (
        _handler_b,
        {"id": "1"},
        "GET, HEAD, OPTIONS, POST",
    )


def test_several_params() -> None:
    router = Router()
    router.add(["GET"], "/a/{x}/b/{y}", _handler_a)
    assert router.resolve("GET", "/a/1/b/2")[1] == {"x": "1", "y": "2"}


def test_exact_route_wins_over_pattern() -> None:
    router = Router()
    router.add(["GET"], "/v1/streams/{id}", _handler_a)
    router.add(["GET"], "/v1/streams/special", _handler_b)
    assert router.resolve("GET", "/v1/streams/special") == (
        _handler_b,
        {},
        "GET, HEAD, OPTIONS",
    )
    assert router.resolve("GET", "/v1/streams/other")[0] is _handler_a


@pytest.mark.parametrize(
    "path",
    [
        "/v1/streams/",  # an empty segment is no id
        "/v1/streams",
        "/v1/streams/a/b",  # {id} never spans a slash
        "/v1/streams/a/",
        "/v1/streams/a/cancel/x",
        "/V1/streams/a",  # paths are case-sensitive
        "/v1/streamsX/a",
        "/healthz/",
        "/healthz/x",
        "//healthz",
        "/healthzz",
        "/",
        "",
    ],
)
def test_unknown_paths_404(path: str) -> None:
    router = Router()
    router.add(["GET"], "/v1/streams/{id}", _handler_a)
    router.add(["POST"], "/v1/streams/{id}/cancel", _handler_b)
    router.add(["GET"], "/healthz", _handler_a)
    with pytest.raises(HTTPError) as info:
        router.resolve("GET", path)
    assert info.value.status == 404
    assert info.value.code == "not_found"


def test_literal_parts_of_patterns_are_not_regexes() -> None:
    router = Router()
    router.add(["GET"], "/.well-known/{name}", _handler_a)
    router.add(["GET"], "/a+b/{name}", _handler_b)
    assert router.resolve("GET", "/.well-known/mercure")[1] == {"name": "mercure"}
    assert router.resolve("GET", "/a+b/x")[0] is _handler_b
    for path in ("/Xwell-known/mercure", "/aab/x", "/aaab/x"):
        with pytest.raises(HTTPError):
            router.resolve("GET", path)


def test_404_message_is_bounded() -> None:
    router = Router()
    with pytest.raises(HTTPError) as info:
        router.resolve("GET", "/" + "x" * 10_000)
    assert len(info.value.message) < 300


def test_wrong_method_gives_no_handler_and_the_allow_list() -> None:
    router = Router()
    router.add(["POST"], "/v1/chat", _handler_a)
    handler, _, allow = router.resolve("GET", "/v1/chat")
    assert handler is None
    assert _allow(allow) == {"POST", "OPTIONS"}  # no HEAD without GET


def test_head_falls_back_to_get() -> None:
    router = Router()
    router.add(["GET"], "/x", _handler_a)
    assert router.resolve("HEAD", "/x")[0] is _handler_a
    router.add(["POST"], "/y", _handler_b)
    assert router.resolve("HEAD", "/y")[0] is None


def test_explicit_head_handler_wins() -> None:
    router = Router()
    router.add(["GET"], "/x", _handler_a)
    router.add(["HEAD"], "/x", _handler_b)
    assert router.resolve("HEAD", "/x")[0] is _handler_b


# --------------------------------------------------------------------------------------
# Application: 405, OPTIONS, HEAD through a fake connection
# --------------------------------------------------------------------------------------


class FakeChannel:
    """Just enough of HTTPProtocol for EventStream.respond()."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.flow = FlowControl(asyncio.get_running_loop())
        self.heads: list[tuple[int, HeaderList]] = []
        self.bodies: list[bytes] = []
        self.ended = 0

    def send_head(
        self, status: int, headers: HeaderList, body: bytes = b"", preamble: bytes = b""
    ) -> bool:
        self.heads.append((status, list(headers)))
        if body:
            self.bodies.append(body)
        return False

    def end_response(self) -> None:
        self.ended += 1

    def close_connection(self, abort: bool = False) -> None:
        pass


def _request(method: str, path: str) -> Request:
    return Request(
        method=method,
        target=path,
        path=path,
        query_string="",
        headers=[(b"host", b"x")],
        http_version="1.1",
    )


def _app() -> tuple[Application, list[str]]:
    app = Application()
    calls: list[str] = []

    async def get(request: Request, stream: EventStream) -> None:
        calls.append(f"GET {request.path} {request.params}")
        stream.respond(200, b"ok")

    async def post(request: Request, stream: EventStream) -> None:
        calls.append(f"POST {request.path} {request.params}")
        stream.respond(200, b"ok")

    app.route(["GET"], "/v1/stream")(get)
    app.route(["POST"], "/v1/stream")(post)
    app.route(["POST"], "/v1/chat")(post)
    app.route(["GET"], "/v1/streams/{id}")(get)
    return app, calls


async def _call(app: Application, method: str, path: str) -> tuple[FakeChannel, EventStream]:
    channel = FakeChannel()
    request = _request(method, path)
    stream = EventStream(request, channel, StreamRegistry(15.0))
    await app(request, stream)
    return channel, stream


def _header(headers: HeaderList, name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/stream", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("PUT", "/v1/stream", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("GET", "/v1/chat", {"POST", "OPTIONS"}),
        ("HEAD", "/v1/chat", {"POST", "OPTIONS"}),
        ("POST", "/v1/streams/abc", {"GET", "HEAD", "OPTIONS"}),
        ("BREW", "/v1/streams/abc", {"GET", "HEAD", "OPTIONS"}),
    ],
)
async def test_405_with_allow(method: str, path: str, allowed: set[str]) -> None:
    app, calls = _app()
    with pytest.raises(HTTPError) as info:
        await _call(app, method, path)
    exc = info.value
    assert exc.status == 405
    assert exc.code == "method_not_allowed"
    headers = dict(exc.headers)
    assert _allow(headers["Allow"]) == allowed
    assert calls == []


async def test_unknown_path_404_inside_the_middlewares() -> None:
    """Middlewares wrap routing, so a 404 still gets a request id, CORS and counts."""
    app, calls = _app()
    seen: list[str] = []

    async def middleware(request: Request, stream: EventStream, call_next: Any) -> None:
        seen.append(request.path)
        await call_next(request, stream)

    app.middlewares.append(middleware)
    with pytest.raises(HTTPError) as info:
        await _call(app, "GET", "/nope")
    assert info.value.status == 404
    assert seen == ["/nope"] and calls == []


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/stream", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("/v1/chat", {"POST", "OPTIONS"}),
        ("/v1/streams/xyz", {"GET", "HEAD", "OPTIONS"}),
    ],
)
async def test_options_answered_204_with_allow(path: str, allowed: set[str]) -> None:
    app, calls = _app()
    channel, stream = await _call(app, "OPTIONS", path)
    assert calls == []
    ((status, headers),) = channel.heads
    assert status == 204
    assert _allow(_header(headers, b"allow") or "") == allowed
    assert _header(headers, b"content-length") is None  # RFC 9110 §8.6
    assert channel.ended == 1
    assert stream.status == 204


async def test_head_is_served_by_get() -> None:
    app, calls = _app()
    channel, _ = await _call(app, "HEAD", "/v1/streams/g1")
    assert calls == ["GET /v1/streams/g1 {'id': 'g1'}"]
    assert channel.heads[0][0] == 200


async def test_params_reach_the_handler() -> None:
    app, calls = _app()
    await _call(app, "GET", "/v1/streams/gen-42")
    assert calls == ["GET /v1/streams/gen-42 {'id': 'gen-42'}"]


async def test_middlewares_run_in_order_around_the_handler() -> None:
    app, calls = _app()
    order: list[str] = []

    def make(name: str) -> Any:
        async def middleware(request: Request, stream: EventStream, call_next: Any) -> None:
            order.append(f"{name}>")
            await call_next(request, stream)
            order.append(f"<{name}")

        return middleware

    app.middlewares.extend([make("a"), make("b")])
    await _call(app, "POST", "/v1/chat")
    assert order == ["a>", "b>", "<b", "<a"]
    assert calls == ["POST /v1/chat {}"]

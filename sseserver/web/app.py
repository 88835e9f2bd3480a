"""The application layer: a small router and the handler the connection layer calls.

Each route declares what the policies around it need to know (``RouteInfo``: whether a
token is required, whether it holds a concurrent-stream slot, whether it counts against
the request rate); routing happens first, so the middlewares read that instead of
keeping path tables of their own."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..http.request import Request
from ..http.stream import EventStream
from ..wire.errors import HTTPError

Handler = Callable[[Request, EventStream], Awaitable[None]]
Middleware = Callable[[Request, EventStream, Handler], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What a route asks of the policies around it (SPEC §9)."""

    # "required": a valid token or 401; "optional": a token is read when sent (the demo
    # page and its files, metrics); "none": never authenticated nor limited (health).
    auth: Literal["required", "optional", "none"] = "required"
    stream: bool = False  # holds one of the caller's concurrent-stream slots while open
    limited: bool = True  # counts against the caller's request rate


UNROUTED = RouteInfo()  # unknown paths and methods: a token first, then 404 / 405


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of routing one request: its handler (None: the method is not
    allowed here), what it declared, and the methods the path allows."""

    handler: Handler | None
    info: RouteInfo
    allow: str
    error: HTTPError | None = None  # the path is unknown (404)


@dataclass(slots=True)
class _Route:
    pattern: re.Pattern[str] | None
    handlers: dict[str, tuple[Handler, RouteInfo]] = field(default_factory=dict)

    @property
    def allow(self) -> str:
        methods = set(self.handlers)
        if "GET" in methods:
            methods.add("HEAD")
        methods.add("OPTIONS")
        return ", ".join(sorted(methods))


class Router:
    """Exact paths in a dict, ``{name}`` patterns (one path segment each) in a list."""

    def __init__(self) -> None:
        self._exact: dict[str, _Route] = {}
        self._patterns: list[_Route] = []

    def add(
        self, methods: Iterable[str], path: str, handler: Handler, info: RouteInfo = UNROUTED
    ) -> None:
        if "{" in path:
            rx = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")
            route = next(
                (r for r in self._patterns if r.pattern and r.pattern.pattern == rx.pattern), None
            )
            if route is None:
                route = _Route(rx)
                self._patterns.append(route)
        else:
            route = self._exact.setdefault(path, _Route(None))
        for method in methods:
            route.handlers[method.upper()] = (handler, info)

    def resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], str]:
        """(handler, path params, Allow header). Raises HTTPError 404 for unknown paths;
        the handler is None when the path exists but not for ``method``."""
        found, params = self.match(method, path)
        return found.handler, params, found.allow

    def match(self, method: str, path: str) -> tuple[Match, dict[str, str]]:
        """The match and the path's parameters. Raises HTTPError 404 for unknown paths;
        the match's handler is None when the path exists but not for ``method``."""
        route = self._exact.get(path)
        params: dict[str, str] = {}
        if route is None:
            for candidate in self._patterns:
                assert candidate.pattern is not None
                m = candidate.pattern.match(path)
                if m:
                    route, params = candidate, m.groupdict()
                    break
        if route is None:
            raise HTTPError(404, "not_found", f"no such path: {path[:200]}")
        found = route.handlers.get(method)
        if found is None and method == "HEAD":
            found = route.handlers.get("GET")
        if found is None:
            return Match(None, UNROUTED, route.allow), params
        return Match(found[0], found[1], route.allow), params


class Application:
    """Routes each request; middlewares (CORS, auth, rate limits) wrap every handler."""

    def __init__(self) -> None:
        self.router = Router()
        self.middlewares: list[Middleware] = []
        self._chained: tuple[tuple[Middleware, ...], Handler] | None = None

    def route(
        self,
        methods: Iterable[str],
        path: str,
        *,
        auth: Literal["required", "optional", "none"] = "required",
        stream: bool = False,
        limited: bool = True,
    ) -> Callable[[Handler], Handler]:
        info = RouteInfo(auth=auth, stream=stream, limited=limited)

        def register(handler: Handler) -> Handler:
            self.router.add(methods, path, handler, info)
            return handler

        return register

    async def __call__(self, request: Request, stream: EventStream) -> None:
        # Route first, so the middlewares read what the route declared; answer inside
        # them, so 404/405 answers get request ids, CORS and counts too.
        try:
            match, request.params = self.router.match(request.method, request.path)
        except HTTPError as exc:
            match = Match(None, UNROUTED, "", exc)
        request.route = match
        await self._chain()(request, stream)

    def _chain(self) -> Handler:
        """The middlewares bound around routing, built once (again if the list changes),
        so a request creates no closures, only each middleware's own coroutine."""
        current = tuple(self.middlewares)
        if self._chained is None or self._chained[0] != current:
            handler: Handler = self._route
            for middleware in reversed(current):
                handler = _bind(middleware, handler)
            self._chained = (current, handler)
        return self._chained[1]

    async def _route(self, request: Request, stream: EventStream) -> None:
        match: Match = request.route
        if match.error is not None:
            raise match.error
        handler, allow = match.handler, match.allow
        if handler is None:
            if request.method == "OPTIONS":
                handler = _options(allow)
            else:
                raise HTTPError(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed here",
                    [("Allow", allow)],
                )
        await handler(request, stream)


def _bind(middleware: Middleware, call_next: Handler) -> Handler:
    def call(request: Request, stream: EventStream) -> Awaitable[None]:
        return middleware(request, stream, call_next)

    return call


def _options(allow: str) -> Handler:
    async def answer(request: Request, stream: EventStream) -> None:
        stream.respond(204, headers=[("Allow", allow)], content_type=None)

    return answer

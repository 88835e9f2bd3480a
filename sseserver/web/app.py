"""The application layer: a small router and the handler the connection layer calls."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from ..http.request import Request
from ..http.stream import EventStream
from ..wire.errors import HTTPError

Handler = Callable[[Request, EventStream], Awaitable[None]]
Middleware = Callable[[Request, EventStream, Handler], Awaitable[None]]


@dataclass(slots=True)
class _Route:
    pattern: re.Pattern[str] | None
    handlers: dict[str, Handler] = field(default_factory=dict)

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

    def add(self, methods: Iterable[str], path: str, handler: Handler) -> None:
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
            route.handlers[method.upper()] = handler

    def resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], str]:
        """(handler, path params, Allow header). Raises HTTPError 404 for unknown paths;
        the handler is None when the path exists but not for ``method``."""
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
        handler = route.handlers.get(method)
        if handler is None and method == "HEAD":
            handler = route.handlers.get("GET")
        return handler, params, route.allow


class Application:
    """Routes each request; middlewares (CORS, auth, rate limits) wrap every handler."""

    def __init__(self) -> None:
        self.router = Router()
        self.middlewares: list[Middleware] = []
        self._chained: tuple[tuple[Middleware, ...], Handler] | None = None

    def route(self, methods: Iterable[str], path: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.router.add(methods, path, handler)
            return handler

        return register

    async def __call__(self, request: Request, stream: EventStream) -> None:
        # Middlewares wrap routing, so 404/405 answers get request ids, CORS and counts.
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
        handler, params, allow = self.router.resolve(request.method, request.path)
        request.params = params
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

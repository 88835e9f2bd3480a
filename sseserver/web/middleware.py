"""Per-request policies wrapped around every handler: request ids, CORS, JWT auth and
rate limits (SPEC §9). They read what each route declared (``RouteInfo``): ``/healthz``
and ``/readyz`` are never authenticated nor limited, the demo page may be fetched without
a token, streams hold a concurrent-stream slot."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from ..http.request import Request
from ..http.stream import EventStream
from ..metrics import Metrics
from ..wire import ids
from ..wire.errors import HTTPError
from .app import Handler, RouteInfo
from .auth import Authenticator
from .ratelimit import ClientAddress, ConcurrencyLimiter, WindowLimiter

CORS_MAX_AGE = "600"
# Mercure-Last-Event-ID and Link carry draft-08's cursors (§6, §7.2); WWW-Authenticate
# its resource metadata (§4.2).
CORS_EXPOSE = (
    "Last-Event-ID, X-Request-ID, Retry-After, Mercure-Last-Event-ID, Link, WWW-Authenticate"
)


async def request_id(request: Request, stream: EventStream, call_next: Handler) -> None:
    """Take nginx's ``X-Request-ID`` when it is sane, else make one; echo it back."""
    request.id = ids.request_id(request.header("x-request-id"))
    stream.extra_headers.append((b"x-request-id", request.id.encode()))
    await call_next(request, stream)


class CORS:
    """An allowlist of origins; credentials only for listed origins; nothing for others."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    async def __call__(self, request: Request, stream: EventStream, call_next: Handler) -> None:
        origin = request.header("origin")
        listed = origin is not None and origin in self.origins
        if origin is None or not (listed or self.any):
            await call_next(request, stream)
            return
        headers = stream.extra_headers
        headers.append((b"access-control-allow-origin", origin.encode("latin-1")))
        headers.append((b"vary", b"Origin"))
        if listed:
            headers.append((b"access-control-allow-credentials", b"true"))
        if request.method == "OPTIONS" and request.header("access-control-request-method"):
            asked = request.header("access-control-request-headers") or ""
            allowed = ", ".join(
                h.strip()
                for h in asked.split(",")
                if re.fullmatch(r"[A-Za-z0-9\-]{1,64}", h.strip())
            )
            stream.respond(
                204,
                headers=[
                    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                    ("Access-Control-Allow-Headers", allowed or "Content-Type, Authorization"),
                    ("Access-Control-Max-Age", CORS_MAX_AGE),
                ],
                content_type=None,
            )
            return
        headers.append((b"access-control-expose-headers", CORS_EXPOSE.encode()))
        await call_next(request, stream)


class Guard:
    """Authentication, then rate limits, for everything but the public paths."""

    def __init__(
        self,
        auth: Authenticator,
        addresses: ClientAddress,
        metrics: Metrics,
        window: WindowLimiter | None = None,
        concurrency: ConcurrencyLimiter | None = None,
    ) -> None:
        self.auth = auth
        self.addresses = addresses
        self.metrics = metrics
        self.window = window
        self.concurrency = concurrency

    async def __call__(self, request: Request, stream: EventStream, call_next: Handler) -> None:
        info: RouteInfo = request.route.info  # what the route declared (routing came first)
        if info.auth == "none" or request.method == "OPTIONS":
            await call_next(request, stream)
            return
        try:
            await self._guarded(request, stream, call_next)
        except HTTPError as exc:
            # 401 from the token check, 403 from a handler's claim check (Mercure topics).
            if exc.status in (401, 403):
                self.metrics.child(self.metrics.auth_failures, str(exc.status)).inc()
            raise

    async def _guarded(self, request: Request, stream: EventStream, call_next: Handler) -> None:
        info: RouteInfo = request.route.info
        claims = self.auth.authenticate(request, required=info.auth == "required")
        request.claims = claims
        if claims is not None:
            stream.log["subject"] = claims.subject
            if claims.expires_at is not None:
                stream.deadline = time.monotonic() + max(0.0, claims.expires_at - time.time())
                stream.deadline_reason = "token_expired"
        if not info.limited:
            await call_next(request, stream)
            return
        key = (
            f"sub:{claims.subject}"
            if claims is not None and claims.subject
            else f"ip:{self.addresses.of(request)}"
        )
        if self.window is not None:
            wait = await self.window.hit(key)
            if wait:
                self.metrics.child(self.metrics.rate_limited, "requests").inc()
                raise HTTPError(
                    429, "rate_limited", "too many requests", [("Retry-After", str(int(wait)))]
                )
        concurrency = self.concurrency
        if concurrency is None or not info.stream:
            await call_next(request, stream)
            return
        taken = await concurrency.acquire(key)
        if taken is None:
            self.metrics.child(self.metrics.rate_limited, "streams").inc()
            raise HTTPError(
                429, "too_many_streams", "too many concurrent streams", [("Retry-After", "1")]
            )
        lease: str = taken
        released = False

        def release(_stream: EventStream | None = None) -> None:
            nonlocal released
            if not released:
                released = True
                concurrency.release(lease)

        try:
            await call_next(request, stream)
        finally:
            if stream.open:
                stream.on_close(release)  # a detached stream holds its slot until it ends
            else:
                release()

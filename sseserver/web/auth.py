"""JWT authentication (SPEC §9) with PyJWT: HS256 with a shared secret, or RS256/ES256/EdDSA
with a public key. Tokens come from ``Authorization: Bearer``, a cookie (``sseserver_token``,
Mercure's ``mercureAuthorization`` or draft-08's ``__Secure-mercure_access_token``) or the
``access_token`` query parameter (EventSource cannot set headers).

Two kinds of token, told apart by their ``typ`` header:
- classic: claims ``mercure.publish`` / ``mercure.subscribe`` (topic selectors), checked
  against ``--jwt-audience`` / ``--jwt-issuer`` when those are set;
- draft-dunglas-mercure-08 (§4): ``typ: at+jwt`` access tokens (RFC 9068) whose
  ``authorization_details`` (RFC 9396) grant ``publish`` / ``subscribe`` on topic
  matchers. ``exp`` and ``iss`` are required, ``aud`` must name the hub's resource
  identifier (``--public-url`` + ``/.well-known/mercure``, else the URL this request
  reached), ``iss`` must equal ``--jwt-issuer`` when it is set, and such a token is never
  taken from the URL (RFC 9700).

Divergences, on purpose: one key (the configured secret or public key) verifies both
kinds and every issuer, so the draft's issuer-to-key binding is the single configured
pair; without ``--jwt-issuer`` any ``iss`` signed with that key is accepted.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, Literal
from urllib.parse import urlsplit

import jwt

from ..http.request import Request
from ..hub.base import Matcher, any_match, matchers_of, matches_any
from ..wire.errors import HTTPError

DRAFT_COOKIE = "__Secure-mercure_access_token"  # draft-08 §4.1.2
COOKIE_NAMES = ("sseserver_token", "mercureAuthorization", DRAFT_COOKIE)
LEEWAY_S = 5  # clock skew tolerated on exp/nbf
WWW_AUTHENTICATE = ("WWW-Authenticate", 'Bearer realm="sseserver"')
MERCURE_PATH = "/.well-known/mercure"
# RFC 9728 §3.1: the well-known prefix goes between the resource's authority and path.
METADATA_PREFIX = "/.well-known/oauth-protected-resource"
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1
DETAIL_TYPE = "https://mercure.rocks/authorization-detail"  # draft-08 §4.4
MATCHER_TYPES = ("exact", "urlpattern")  # draft-08 §3: both are required
# Limits on what one token may carry (draft-08 §4.4: past them, invalid_token).
MAX_DETAILS = 64
MAX_DETAIL_TOPICS = 64
MAX_PATTERN_LENGTH = 2048

TokenSource = Literal["header", "cookie", "query"]


def clean_text(value: str) -> bool:
    """No C0 or C1 control, no DEL, no Unicode format character (category Cf): what
    draft-08 asks of topics, matchers, ids and types (§2, §3, §5)."""
    for ch in value:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return False
        if code > 0x9F and unicodedata.category(ch) == "Cf":
            return False
    return True


def hub_url(public_url: str | None, host: str | None) -> str:
    """The hub's URL, which is also its resource identifier (draft-08 §4.3): the public
    URL clients use (behind nginx it is not the listening one), else the address this
    request reached. A Host header that is no plain host[:port] is not believed."""
    if public_url:
        return public_url.rstrip("/") + MERCURE_PATH
    if (
        not host
        or len(host) > 255
        or not all(c.isascii() and (c.isalnum() or c in ".-:[]") for c in host)
    ):
        host = "localhost"
    return f"http://{host}{MERCURE_PATH}"


def metadata_url(hub: str) -> str:
    """Where the protected resource metadata of ``hub`` is served (RFC 9728 §3.1)."""
    parts = urlsplit(hub)
    return f"{parts.scheme}://{parts.netloc}{METADATA_PREFIX}{parts.path}"


def is_access_token(typ: Any) -> bool:
    """RFC 9068 §4: ``at+jwt`` or ``application/at+jwt``, compared case-insensitively."""
    if not isinstance(typ, str):
        return False
    return bool(typ.lower().removeprefix("application/") == ACCESS_TOKEN_TYPE)


@dataclass(frozen=True, slots=True)
class Grant:
    """One Mercure authorization detail of an access token (draft-08 §4.4)."""

    publish: bool
    subscribe: bool
    topics: tuple[Matcher, ...]
    payload: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Claims:
    subject: str | None
    publish: tuple[str, ...] | None = None  # Mercure topic selectors; None = claim absent
    subscribe: tuple[str, ...] | None = None
    expires_at: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    # A draft-08 access token's grants (its authorization_details); None: a classic token.
    grants: tuple[Grant, ...] | None = None
    via: TokenSource = "header"

    @property
    def draft(self) -> bool:
        return self.grants is not None

    def may_publish(self, topic: str) -> bool:
        if self.grants is not None:
            return any(g.publish and matches_any(g.topics, (topic,)) for g in self.grants)
        return self.publish is not None and any_match(self.publish, (topic,))

    def may_subscribe(self, topic: str) -> bool:
        """Whether private updates of ``topic`` may be read (and, for the subscription
        API, whether its resource may be)."""
        if self.grants is not None:
            return any(g.subscribe and matches_any(g.topics, (topic,)) for g in self.grants)
        return self.subscribe is not None and any_match(self.subscribe, (topic,))

    def private_matchers(self) -> tuple[Matcher, ...] | None:
        """The matchers that let private updates through to this token's bearer."""
        if self.grants is not None:
            return tuple(m for g in self.grants if g.subscribe for m in g.topics)
        return None if self.subscribe is None else matchers_of(self.subscribe)

    def payload_for(self, match: str) -> Any:
        """The payload of the first subscribe grant whose topics match a subscription's
        own matcher string (draft-08 §4.6); a classic token's ``mercure.payload``."""
        if self.grants is None:
            claim = self.raw.get("mercure")
            return claim.get("payload") if isinstance(claim, dict) else None
        for grant in self.grants:
            if grant.subscribe and matches_any(grant.topics, (match,)):
                return grant.payload
        return None


def _selectors(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def parse_grants(details: Any, base: str) -> tuple[Grant, ...]:
    """The Mercure authorization details among ``authorization_details`` (others are
    another API's business and ignored). Any malformed Mercure detail invalidates the
    token as a whole (draft-08 §4.4: no partial acceptance).

    Raises:
        ValueError: a detail, an action list, a topic matcher or a limit is violated.
    """
    if details is None:
        return ()
    if not isinstance(details, list) or len(details) > MAX_DETAILS:
        raise ValueError("authorization_details must be an array of at most 64 objects")
    grants: list[Grant] = []
    for detail in details:
        if not isinstance(detail, dict) or not isinstance(detail.get("type"), str):
            raise ValueError("each authorization detail must be an object with a type")
        if detail["type"] != DETAIL_TYPE:
            continue
        actions = detail.get("actions")
        if not isinstance(actions, list) or not actions:
            raise ValueError("actions must be a non-empty array")
        if not all(isinstance(a, str) for a in actions):
            raise ValueError("actions must be strings")
        topics = detail.get("topics")
        if not isinstance(topics, list) or not topics or len(topics) > MAX_DETAIL_TOPICS:
            raise ValueError("topics must be a non-empty array of at most 64 matchers")
        matchers = tuple(_grant_matcher(t, base) for t in topics)
        payload = detail.get("payload")
        if "payload" in detail and not isinstance(payload, dict):
            raise ValueError("payload must be an object")
        # Actions this hub does not know grant nothing, and spoil nothing (§4.4).
        grants.append(Grant("publish" in actions, "subscribe" in actions, matchers, payload))
    return tuple(grants)


def _grant_matcher(entry: Any, base: str) -> Matcher:
    if not isinstance(entry, dict) or not isinstance(entry.get("match"), str):
        raise ValueError("each topic matcher must be an object with a match string")
    kind = entry.get("match_type", "exact")
    if kind not in MATCHER_TYPES:
        raise ValueError("unsupported match_type")
    pattern: str = entry["match"]
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH or not clean_text(pattern):
        raise ValueError("invalid match")
    return Matcher.of("exact" if kind == "exact" else "urlpattern", pattern, base)


def token_source(request: Request) -> tuple[str, TokenSource] | None:
    """The request's token and where it came from: the Authorization header first (a
    cookie beside it is ignored, draft-08 §4.1), then a cookie, then the query."""
    header = request.header("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip(), "header"
    cookie_header = request.header("cookie")
    if cookie_header:
        try:
            cookies = SimpleCookie(cookie_header)
        except CookieError:
            cookies = SimpleCookie()
        for name in COOKIE_NAMES:
            if name in cookies and cookies[name].value:
                return cookies[name].value, "cookie"
    query_token = request.query_param("access_token")
    return (query_token, "query") if query_token else None


def token_from(request: Request) -> str | None:
    found = token_source(request)
    return found[0] if found is not None else None


def on_hub(path: str) -> bool:
    return path == MERCURE_PATH or path.startswith(MERCURE_PATH + "/")


def draft_request(request: Request) -> bool:
    """Whether a request to the hub speaks draft-08: it names a matcher (the reserved
    ``match`` namespace), uses the QUERY method, or the subscription API."""
    path = request.path
    if path.startswith(MERCURE_PATH + "/") or request.method == "QUERY":
        return True
    return path == MERCURE_PATH and any(k[:5].lower() == "match" for k in request.query)


def challenge(
    request: Request | None,
    error: str | None = None,
    *,
    public_url: str | None = None,
    draft: bool = False,
) -> tuple[str, str]:
    """The ``WWW-Authenticate`` header. For draft-08 requests and tokens it follows RFC
    6750 §3 and RFC 9728 §5.1 (the error code, and where the resource metadata is) as
    draft-08 §4.2 asks; for everything else it stays the bare challenge."""
    if not draft and (request is None or not draft_request(request)):
        return WWW_AUTHENTICATE
    value = 'Bearer realm="sseserver"'
    if error is not None:
        value += f', error="{error}"'
    if request is not None or public_url:
        host = request.header("host") if request is not None else None
        value += f', resource_metadata="{metadata_url(hub_url(public_url, host))}"'
    return ("WWW-Authenticate", value)


class Authenticator:
    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        public_url: str | None = None,
    ) -> None:
        if public_key is not None and not public_key.lstrip().startswith("-----BEGIN"):
            with open(public_key, encoding="utf-8") as f:  # a path to a PEM file
                public_key = f.read()
        self._key: str | None = public_key or secret
        # An allowlist fixed by the key's kind, never read from a token (RFC 8725 §3.1);
        # PyJWT also refuses an algorithm that does not fit the key (HS256 with a PEM).
        self._algorithms: Sequence[str] = ["RS256", "ES256", "EdDSA"] if public_key else ["HS256"]
        self._audience = audience
        self._issuer = issuer
        self.public_url = public_url

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def resource_identifier(self, request: Request | None) -> str:
        return hub_url(self.public_url, request.header("host") if request else None)

    def challenge(self, request: Request | None, error: str | None = None) -> tuple[str, str]:
        return challenge(request, error, public_url=self.public_url)

    def decode(
        self, token: str, request: Request | None = None, via: TokenSource = "header"
    ) -> Claims:
        """Raises HTTPError 401 (with WWW-Authenticate) for a bad or expired token, 400
        for a draft-08 access token sent in the URL."""
        assert self._key is not None
        try:
            typ = jwt.get_unverified_header(token).get("typ")
        except jwt.PyJWTError:
            typ = None
        if is_access_token(typ):
            return self._decode_access_token(token, request, via)
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=list(self._algorithms),
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"verify_aud": bool(self._audience)},
            )
        except jwt.ExpiredSignatureError:
            raise HTTPError(
                401,
                "token_expired",
                "token has expired",
                [self.challenge(request, "invalid_token")],
            ) from None
        except jwt.PyJWTError as exc:
            raise HTTPError(
                401,
                "invalid_token",
                f"invalid token: {exc}"[:200],
                [self.challenge(request, "invalid_token")],
            ) from None
        mercure_claim = payload.get("mercure")
        mercure: dict[str, Any] = mercure_claim if isinstance(mercure_claim, dict) else {}
        exp = payload.get("exp")
        return Claims(
            subject=str(payload["sub"]) if payload.get("sub") is not None else None,
            publish=_selectors(mercure.get("publish")),
            subscribe=_selectors(mercure.get("subscribe")),
            expires_at=float(exp) if isinstance(exp, (int, float)) else None,
            raw=payload,
            via=via,
        )

    def _decode_access_token(self, token: str, request: Request | None, via: TokenSource) -> Claims:
        """A draft-08 access token (§4.3). Every failure is the same ``invalid_token``,
        which tells no one why (§4.2)."""
        assert self._key is not None
        if via == "query":
            raise HTTPError(
                400,
                "invalid_request",
                "an access token may not be sent in the URL; use the Authorization header "
                "or the cookie",
                [challenge(request, "invalid_request", public_url=self.public_url, draft=True)],
            )
        resource = self.resource_identifier(request)
        refused = HTTPError(
            401,
            "invalid_token",
            "invalid access token",
            [challenge(request, "invalid_token", public_url=self.public_url, draft=True)],
        )
        if request is None and self.public_url is None:
            raise refused  # no resource identifier to check the audience against
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=list(self._algorithms),
                audience=resource,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud"], "verify_aud": True},
            )
        except jwt.PyJWTError:
            raise refused from None
        if not isinstance(payload.get("iss"), str) or not payload["iss"]:
            raise refused
        try:
            grants = parse_grants(payload.get("authorization_details"), resource)
        except ValueError:
            raise refused from None
        return Claims(
            subject=str(payload["sub"]) if payload.get("sub") is not None else None,
            expires_at=float(payload["exp"]),
            raw=payload,
            grants=grants,
            via=via,
        )

    def authenticate(self, request: Request, *, required: bool = True) -> Claims | None:
        """The request's claims; None when auth is off, or no token and not required.

        Raises:
            HTTPError: 401 when a token is required and missing, or any token is bad.
        """
        if not self.enabled:
            return None
        found = token_source(request)
        if found is None:
            if required:
                raise HTTPError(
                    401, "unauthorized", "a bearer token is required", [self.challenge(request)]
                )
            return None
        token, via = found
        return self.decode(token, request, via)

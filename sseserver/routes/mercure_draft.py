"""What draft-dunglas-mercure-08 adds to the hub's URL, as pure functions: reading a
subscription's parameters (§3: the ``match`` namespace, query and body together,
``last_event_id``) and the publish rules of §5 that guard what the hub generates itself
(its reserved namespace and the ``mercure`` event type).

The classic protocol's ``topic=`` selectors are read here too, so that one request may
carry both kinds (the reference hub's compatibility mode accepts that as well).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from urlpattern import URLPattern

from ..http.request import Request
from ..hub.base import Matcher, MatcherType
from ..web.auth import MERCURE_PATH, clean_text
from ..wire.errors import HTTPError

MAX_MATCHERS = 64  # topic= and match* together, per subscription request
MAX_MATCHER_LENGTH = 2048
MAX_FIELDS = 1000  # fields of one form: a publish, or a subscription's query and body
# The matcher query parameters (§3); any other name in the ``match`` namespace is a 400.
MATCH_PARAMS: dict[str, MatcherType] = {
    "match": "exact",
    "match_exact": "exact",
    "match_urlpattern": "urlpattern",
}
RESERVED_TYPE = "mercure"  # the SSE event type of subscription events (§7.1)
FORM = "application/x-www-form-urlencoded"
_ANY_PATH = URLPattern({"pathname": "*"})
_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")


def bad(message: str) -> HTTPError:
    return HTTPError(400, "bad_request", message[:300])


def form_pairs(text: str) -> list[tuple[str, str]]:
    """``application/x-www-form-urlencoded`` name/value pairs, in order, names without a
    value kept with an empty one. Raises HTTPError 400 for bytes that are not UTF-8 and
    for more than ``MAX_FIELDS`` fields (a publish's topic limits are 413, §5)."""
    try:
        return parse_qsl(
            text,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise bad("parameters must be UTF-8") from None
    except ValueError:
        raise bad(f"form has more than {MAX_FIELDS} fields") from None


def query_pairs(request: Request) -> list[tuple[str, str]]:
    # h11 hands the target over as latin-1: raw non-ASCII bytes are checked as UTF-8 too.
    try:
        text = request.query_string.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise bad("parameters must be UTF-8") from None
    return form_pairs(text)


def body_pairs(request: Request) -> list[tuple[str, str]]:
    """The form body of a QUERY subscription (§3); nothing for GET and HEAD."""
    if request.method != "QUERY" or not request.body:
        return []
    ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
    if ctype != FORM:
        raise HTTPError(415, "unsupported_media_type", f"send the parameters as {FORM}")
    try:
        return form_pairs(request.body.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("parameters must be UTF-8") from None


@dataclass(frozen=True, slots=True)
class SubscribeParams:
    """What one subscription request asks for."""

    topics: tuple[str, ...]  # classic ``topic=`` selectors
    matchers: tuple[Matcher, ...]  # draft-08 matchers, in request order
    last_event_id: str | None  # the id to resume after (None: no resume asked)

    @property
    def draft(self) -> bool:
        return bool(self.matchers)


def subscribe_params(request: Request, base: str) -> SubscribeParams:
    """Read a subscription: the union of its query and its form body (§3), each matcher
    checked (reserved names, characters, length, count, URL Pattern syntax).

    Raises:
        HTTPError: 400 for a request the draft says to refuse; 415 for a body not a form.
    """
    query = query_pairs(request)
    pairs = query + body_pairs(request)
    topics: list[str] = []
    matchers: list[Matcher] = []
    for name, value in pairs:
        if name == "topic":
            topics.append(value)
        elif name[:5].lower() == "match":
            kind = MATCH_PARAMS.get(name)
            if kind is None:
                raise bad(f"unknown matcher parameter {name[:64]!r}: use match or match_urlpattern")
            matchers.append(_matcher(name, kind, value, base))
        else:
            continue
        if len(topics) + len(matchers) > MAX_MATCHERS:
            raise bad(f"at most {MAX_MATCHERS} topics and matchers")
    if not matchers:
        if not topics or not all(topics):
            raise bad("topic is required")
    if any(len(t) > MAX_MATCHER_LENGTH for t in topics):
        raise bad(f"topic longer than {MAX_MATCHER_LENGTH} characters")
    if any(not t or not clean_text(t) for t in topics) and matchers:
        raise bad("topic: empty, or with a control or format character")
    return SubscribeParams(tuple(topics), tuple(matchers), _last_event_id(request, query, pairs))


def _matcher(name: str, kind: MatcherType, value: str, base: str) -> Matcher:
    if not value:
        raise bad(f"{name}: empty")
    if len(value) > MAX_MATCHER_LENGTH:
        raise bad(f"{name}: longer than {MAX_MATCHER_LENGTH} characters")
    if not clean_text(value):
        raise bad(f"{name}: control or format character")
    try:
        return Matcher.of(kind, value, base)
    except ValueError:
        # The compiler's message is not echoed: it may quote the pattern at length.
        raise bad(f"{name}: not a well-formed URL Pattern") from None


def _last_event_id(
    request: Request, query: list[tuple[str, str]], pairs: list[tuple[str, str]]
) -> str | None:
    """The ``Last-Event-ID`` header first (§6), then the query's ``last_event_id`` (or the
    classic ``lastEventID``), then the body's: single-valued, the query's wins (§3)."""
    header = request.header("last-event-id")
    if header:
        return header
    for source in (query, pairs):
        for name, value in source:
            if name in ("last_event_id", "lastEventID") and value:
                return value
    return None


# -- publishing ---------------------------------------------------------------------------


def hub_path(hub: str) -> str:
    """The path of the hub's URL (its reserved namespace's root)."""
    return _resolved_path(hub, hub) or MERCURE_PATH


def reserved_topic(topic: str, hub: str) -> bool:
    """Whether ``topic``, resolved against the hub's URL by the WHATWG URL parser, has
    the hub's path or lies below it, after dot-segments are removed and escaped
    unreserved characters decoded (§5): ``/.well-known/%6Dercure/…`` and
    ``…/x/../mercure/…`` are caught as well. A topic that is no URL reference is not."""
    path = _resolved_path(topic, hub)
    if path is None:
        return False
    root = hub_path(hub)
    return path == root or path.startswith(root + "/")


def _resolved_path(topic: str, base: str) -> str | None:
    found = _ANY_PATH.exec(topic, base)
    if found is None:
        return None
    path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), found["pathname"]["input"])
    return _remove_dot_segments(path)


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(out) > 1:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if path.endswith(("/.", "/..")):
        out.append("")
    return "/".join(out)


def check_publish(
    topics: list[str], event_id: str | None, event_type: str | None, hub: str
) -> None:
    """The rules of §5 for every publisher, classic or draft-08: topics of clean
    characters, neither ``*`` nor in the hub's reserved namespace (where subscription
    events live); an id that does not start with ``#`` and is clean; a type that is
    clean and not the reserved ``mercure``.

    Raises:
        HTTPError: 400 naming the field.
    """
    for topic in topics:
        if topic == "*":
            raise bad("topic: '*' is the wildcard, not a topic")
        if not clean_text(topic):
            raise bad("topic: control or format character")
        if reserved_topic(topic, hub):
            raise bad("topic: the hub's own namespace is reserved for what it generates")
    if event_id is not None and (event_id.startswith("#") or not clean_text(event_id)):
        raise bad("id: must not start with '#' nor hold control or format characters")
    if event_type is not None:
        if event_type == RESERVED_TYPE:
            raise bad("type: 'mercure' is reserved for the hub's subscription events")
        if not clean_text(event_type):
            raise bad("type: control or format character")

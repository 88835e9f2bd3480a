"""Scripted SSE wire scenarios for testing SSE clients (SPEC §6, ``GET /v1/test/stream``):
the query's parameters, checked and bounded, and the body they describe as a list of
timed pieces. Pure: no I/O, no asyncio; ``scenario_wire`` turns the pieces into HTTP.

Each parameter changes one thing about the wire, and they combine freely. The same
parameters always give the same bytes: nothing here reads a clock or a random source.

Divergences from what the server's own streams do, on purpose:
- no ``retry:`` preamble nor opening comment: the body holds exactly what was asked for;
- fields are written in the order asked for, ``id`` may be empty (a reset) or hold NUL,
  and ``retry`` may hold anything but a line break, so that clients meet what the
  encoder (``wire.sse``) refuses to write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import permutations
from urllib.parse import parse_qsl

# Bounds: a scenario is a test fixture, never a way to tie up the server (SPEC §3).
MAX_EVENTS = 1000
MAX_DATA_LINES = 100
MAX_SIZE = 64 * 1024  # characters per data line
MAX_BODY_BYTES = 1024 * 1024  # the whole body, framing excluded
MAX_WRITES = 20_000  # planned TCP writes per response
MAX_WAIT_MS = 300_000  # one wait: 5 minutes, past every common proxy's idle timeout
MAX_DRIP_MS = 10_000
MIN_HEARTBEAT_MS = 10
MAX_DURATION_MS = 600_000  # all waits of one response together
MAX_TEXT = 200  # event names, retry values, chunk extensions, locations

LINE_ENDINGS = {"lf": ("\n",), "crlf": ("\r\n",), "cr": ("\r",), "mixed": ("\n", "\r\n", "\r")}
PAYLOADS = ("text", "unicode", "empty", "json", "openai")
FRAMINGS = ("chunked", "length", "close")
ENDS = ("clean", "close", "rst")
STATUSES = (200, 204, 301, 302, 307, 308, 400, 401, 403, 404, 429, 500, 502, 503)
FIELD_LETTERS = "ierd"  # id, event, retry, data: the project encoder's own order
ORDERS = ["".join(p) for p in permutations(FIELD_LETTERS)]
DEFAULT_CONTENT_TYPE = "text/event-stream; charset=utf-8"
HEARTBEAT = "ping"
DONE = "[DONE]"
# Query parameters that belong to others: resumption (EventSource cannot set headers on
# its first request) and a JWT for browsers.
PASSED_THROUGH = frozenset(("lastEventID", "last_event_id", "access_token"))


@dataclass(frozen=True, slots=True)
class Scenario:
    """What one response looks like; each field is the query parameter of its name."""

    events: int = 3
    payload: str = "text"
    size: int = 0
    data_lines: int = 1
    event: str = ""
    ids: bool = True
    id_reset: frozenset[int] = frozenset()
    id_nul: frozenset[int] = frozenset()
    retry: str | None = None
    order: str = FIELD_LETTERS
    line_endings: str = "lf"
    bom: bool = False
    comments: bool = False
    space: bool = True
    unknown: bool = False
    split: int = 0
    split_at: tuple[int, ...] = ()
    chunk: int = 0  # 0: one chunk per piece (event, comment)
    chunk_ext: str = ""
    framing: str = ""  # "": chunked, or close-delimited for an HTTP/1.0 request or answer
    version: str = "1.1"
    status: int = 200
    content_type: str | None = DEFAULT_CONTENT_TYPE
    location: str = ""
    interval_ms: int = 0
    drip_ms: int = 0
    pause_ms: int = 0
    pause_after: int = 0
    heartbeat_ms: int = 0
    partial: int = 0
    end: str = "clean"
    drop_after: int = 0
    after: int = 0  # the Last-Event-ID to resume after
    path: str = "/v1/test/stream"
    query: tuple[tuple[str, str], ...] = field(default=(), compare=False)


def _int(name: str, text: str, low: int, high: int) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{name} must be a whole number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


def _bool(name: str, text: str) -> bool:
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0")


def _ints(name: str, text: str, low: int, high: int) -> tuple[int, ...]:
    parts = [p for p in text.split(",") if p]
    if not parts or len(parts) > MAX_EVENTS:
        raise ValueError(f"{name} must be a comma-separated list of 1 to {MAX_EVENTS} numbers")
    return tuple(sorted({_int(name, p, low, high) for p in parts}))


def _text(name: str, text: str) -> str:
    if len(text) > MAX_TEXT or any(c in text for c in "\r\n\0"):
        raise ValueError(f"{name} must be at most {MAX_TEXT} characters, without CR, LF or NUL")
    return text


def _choice(name: str, text: str, choices: Iterable[str]) -> str:
    options = tuple(choices)
    if text not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}")
    return text


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _chunk_ext(text: str) -> str:
    # RFC 9112 §7.1.1: chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ).
    name, _, value = text.partition("=")
    if not name or len(text) > MAX_TEXT or not set(name + value) <= _TOKEN:
        raise ValueError("chunk_ext must be name or name=value, both tokens (RFC 9112)")
    return text


def _location(text: str) -> str:
    if not text.startswith("/") or text.startswith("//") or not text.isascii():
        raise ValueError("location must be a path on this server, starting with one /")
    if any(c <= " " or c == "\x7f" for c in text):
        raise ValueError("location must not hold spaces or control characters")
    return _text("location", text)


_PARSERS: dict[str, Callable[[str], object]] = {
    "events": lambda v: _int("events", v, 0, MAX_EVENTS),
    "payload": lambda v: _choice("payload", v, PAYLOADS),
    "size": lambda v: _int("size", v, 0, MAX_SIZE),
    "data_lines": lambda v: _int("data_lines", v, 1, MAX_DATA_LINES),
    "event": lambda v: _text("event", v),
    "ids": lambda v: _bool("ids", v),
    "id_reset": lambda v: frozenset(_ints("id_reset", v, 1, MAX_EVENTS)),
    "id_nul": lambda v: frozenset(_ints("id_nul", v, 1, MAX_EVENTS)),
    "retry": lambda v: _text("retry", v),
    "order": lambda v: v if v == "rotate" else _choice("order", v, [*ORDERS, "rotate"]),
    "line_endings": lambda v: _choice("line_endings", v, LINE_ENDINGS),
    "bom": lambda v: _bool("bom", v),
    "comments": lambda v: _bool("comments", v),
    "space": lambda v: _bool("space", v),
    "unknown": lambda v: _bool("unknown", v),
    "split": lambda v: _int("split", v, 1, MAX_BODY_BYTES),
    "split_at": lambda v: _ints("split_at", v, 1, MAX_BODY_BYTES),
    "chunk": lambda v: 0 if v == "event" else _int("chunk", v, 1, MAX_BODY_BYTES),
    "chunk_ext": _chunk_ext,
    "framing": lambda v: _choice("framing", v, FRAMINGS),
    "version": lambda v: _choice("version", v, ("1.1", "1.0")),
    "status": lambda v: int(_choice("status", v, map(str, STATUSES))),
    "content_type": lambda v: None if v == "none" else _text("content_type", v),
    "location": _location,
    "interval_ms": lambda v: _int("interval_ms", v, 0, MAX_WAIT_MS),
    "drip_ms": lambda v: _int("drip_ms", v, 0, MAX_DRIP_MS),
    "pause_ms": lambda v: _int("pause_ms", v, 0, MAX_WAIT_MS),
    "pause_after": lambda v: _int("pause_after", v, 0, MAX_EVENTS),
    "heartbeat_ms": lambda v: _int("heartbeat_ms", v, MIN_HEARTBEAT_MS, MAX_WAIT_MS),
    "partial": lambda v: _int("partial", v, 1, MAX_BODY_BYTES),
    "end": lambda v: _choice("end", v, ENDS),
    "drop_after": lambda v: _int("drop_after", v, 1, MAX_EVENTS),
}
PARAMETERS = tuple(_PARSERS)


def parse_scenario(
    query: str | Mapping[str, Sequence[str]],
    *,
    last_event_id: str | None = None,
    http10_request: bool = False,
    path: str = "/v1/test/stream",
) -> Scenario:
    """The scenario a query string (or parsed query) asks for.

    Raises:
        ValueError: a parameter is unknown, given twice, malformed or out of bounds; the
            message names it.
    """
    if isinstance(query, str):
        pairs = parse_qsl(query, keep_blank_values=True)
    else:
        pairs = [(k, v) for k, values in query.items() for v in values]
    values: dict[str, object] = {}
    kept: list[tuple[str, str]] = []
    for name, text in pairs:
        if name in PASSED_THROUGH:
            continue
        parser = _PARSERS.get(name)
        if parser is None:
            raise ValueError(f"unknown parameter {name[:50]!r}")
        if name in values:
            raise ValueError(f"{name} is given twice")
        values[name] = parser(text)
        kept.append((name, text))
    scenario = Scenario(**values, path=path, query=tuple(kept))  # type: ignore[arg-type]
    if last_event_id:
        scenario = replace(scenario, after=_int("Last-Event-ID", last_event_id, 0, 10**9))
    return _checked(scenario, http10_request)


def _checked(s: Scenario, http10_request: bool) -> Scenario:
    framing = s.framing or ("close" if http10_request or s.version == "1.0" else "chunked")
    if framing == "chunked" and (http10_request or s.version == "1.0"):
        raise ValueError("framing=chunked needs HTTP/1.1 on both sides")
    if (s.chunk or s.chunk_ext) and framing != "chunked":
        raise ValueError("chunk and chunk_ext need framing=chunked")
    if s.split and s.split_at:
        raise ValueError("give split or split_at, not both")
    if s.payload == "openai" and s.event:
        raise ValueError("payload=openai takes no event name (the SDK reads unnamed events)")
    # A cheap upper bound before any byte is built (the exact size is checked after).
    estimate = s.events * s.data_lines * (max(s.size, 60) + 12)
    if estimate > 4 * MAX_BODY_BYTES:
        raise ValueError(f"the body would exceed {MAX_BODY_BYTES} bytes")
    waits = (max(s.events - 1, 0)) * s.interval_ms + s.pause_ms
    if waits > MAX_DURATION_MS:
        raise ValueError(f"the waits add up to more than {MAX_DURATION_MS} ms")
    if s.heartbeat_ms and waits // s.heartbeat_ms > MAX_WRITES:
        raise ValueError(f"more than {MAX_WRITES} heartbeats")
    return replace(s, framing=framing)


def describe(s: Scenario) -> dict[str, object]:
    """The parameters that differ from the defaults (for logs and reports)."""
    base = Scenario()
    out: dict[str, object] = {}
    for f in fields(s):
        value = getattr(s, f.name)
        if f.name not in ("path", "query") and value != getattr(base, f.name):
            out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out

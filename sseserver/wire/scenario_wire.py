"""A scenario's response as exact bytes and the TCP writes they go out in: the head, the
body's framing (chunked, Content-Length or close-delimited, RFC 9112 §6), where writes
and chunks are cut, the waits between them and how the connection ends. Pure: the route
(``routes/test_stream.py``) only plays a ``Plan`` back.

Cuts: ``split`` and ``split_at`` cut each piece of the body (an event, a heartbeat, the
BOM) into writes at offsets counted from the piece's first byte; each piece starts a new
write. A chunk's size line goes with its first data byte and its closing CRLF with its
last, so a cut that falls on a chunk boundary falls between the two chunks.

Divergences, on purpose: no ``Date`` header (the same scenario must give the same bytes;
RFC 9110 §6.6.1 lets a server without a reliable clock leave it out), and every answer
closes its connection (``Connection: close``), so a scenario is one connection and its
offsets count from the connection's first byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from urllib.parse import urlencode

from .errors import error_body
from .scenario import MAX_BODY_BYTES, MAX_DURATION_MS, MAX_WRITES, Scenario
from .scenario_body import Piece, pieces

MAX_CHUNKS = 100_000
LAST_CHUNK = b"0\r\n\r\n"

CORS = ("access-control-allow-origin", "*")  # any page may open a scenario
CLOSE = ("connection", "close")  # one scenario, one connection

REASONS = {
    200: "OK",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Plan:
    """Every byte of one response and how it goes out: write ``i`` is
    ``wire[cuts[i-1]:cuts[i]]``, sent ``waits_ms[i]`` after the previous one; then, after
    ``end_wait_ms``, the connection is closed (``end="rst"``: reset)."""

    status: int
    wire: bytes
    cuts: tuple[int, ...]
    waits_ms: tuple[int, ...]
    end: str  # "close" (FIN) or "rst"
    end_wait_ms: int = 0
    head_size: int = 0
    events: tuple[int, ...] = ()  # the numbers of the whole events sent

    def writes(self) -> Iterator[tuple[int, memoryview]]:
        """(wait in ms, bytes) of each write, in order."""
        view = memoryview(self.wire)
        start = 0
        for wait, cut in zip(self.waits_ms, self.cuts, strict=True):
            yield wait, view[start:cut]
            start = cut

    @property
    def duration_ms(self) -> int:
        return sum(self.waits_ms) + self.end_wait_ms

    @property
    def body(self) -> bytes:
        return self.wire[self.head_size :]


def head(status: int, version: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/{version} {status} {REASONS[status]}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def redirect_target(s: Scenario) -> str:
    """Where a 3xx points: ``location``, or the same scenario without ``status`` (so a
    client that follows it gets the stream)."""
    if s.location:
        return s.location
    rest = [(k, v) for k, v in s.query if k not in ("status", "location")]
    return s.path + ("?" + urlencode(rest) if rest else "")


def build_plan(s: Scenario, *, head_only: bool = False) -> Plan:
    """The exact response for ``s``.

    Raises:
        ValueError: the body, the number of writes or chunks, or the waits exceed their
            bounds.
    """
    status = s.status
    if status == 200 and s.after and s.after >= s.events:
        status = 204  # resumed past the end: EventSource stops reconnecting
    if status != 200:
        return _answer(s, status, head_only)
    parts = pieces(s)
    body = b"".join(p.data for p in parts)
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"the body would be {len(body)} bytes, over {MAX_BODY_BYTES}")
    headers = [("content-type", s.content_type)] if s.content_type is not None else []
    headers += [("cache-control", "no-cache"), ("x-accel-buffering", "no"), CORS]
    if s.framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
    elif s.framing == "length":
        headers.append(("content-length", str(len(body))))
    response_head = head(200, s.version, [*headers, CLOSE])
    events = tuple(p.number for p in parts if p.kind == "event")
    if head_only:
        size = len(response_head)
        return Plan(200, response_head, (size,), (0,), "close", head_size=size)

    starts, waits = _write_starts(s, parts)
    end_wait = parts[-1].wait_ms if parts and parts[-1].kind == "end" else 0
    chunked = s.framing == "chunked"
    chunk_starts = _chunk_starts(s, parts, len(body)) if chunked else []
    framed, cuts = _frame(body, starts, chunk_starts, s.chunk_ext, len(response_head))
    framed[:0] = response_head
    all_cuts = [len(response_head), *cuts]
    all_waits = [0, *waits]
    if chunked and s.end == "clean":
        framed += LAST_CHUNK
        all_cuts.append(len(framed))
        all_waits.append(end_wait + (s.drip_ms if starts else 0))
        end_wait = 0
    plan = Plan(
        200,
        bytes(framed),
        tuple(all_cuts),
        tuple(all_waits),
        "rst" if s.end == "rst" else "close",
        end_wait,
        len(response_head),
        events,
    )
    if plan.duration_ms > MAX_DURATION_MS:
        raise ValueError(f"the waits would add up to {plan.duration_ms} ms, over {MAX_DURATION_MS}")
    return plan


def _answer(s: Scenario, status: int, head_only: bool) -> Plan:
    """A scripted non-200 answer: a redirect, 204, or an error with a JSON body."""
    headers = [CORS]
    body = b""
    if 300 <= status < 400:
        headers += [("location", redirect_target(s)), ("content-length", "0")]
    elif status != 204:
        body = error_body("scripted_status", f"a scripted {status} answer")
        headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        if status in (429, 503):
            headers.append(("retry-after", "1"))
    response_head = head(status, s.version, [*headers, CLOSE])
    wire = response_head + (b"" if head_only else body)
    return Plan(status, wire, (len(wire),), (0,), "close", head_size=len(response_head))


def _cuts_in(s: Scenario, size: int) -> list[int]:
    """Offsets inside one piece where a new write starts."""
    if s.split:
        return list(range(s.split, size, s.split))
    return [o for o in s.split_at if o < size]


def _write_starts(s: Scenario, parts: list[Piece]) -> tuple[list[int], list[int]]:
    """Body offsets where each write starts, and the wait before each."""
    count = sum(1 + len(_cuts_in(s, len(p.data))) for p in parts if p.data and not s.split)
    count += sum(-(-len(p.data) // s.split) for p in parts if p.data and s.split)
    if count > MAX_WRITES:
        raise ValueError(f"the body would take {count} writes, over {MAX_WRITES}")
    starts: list[int] = []
    waits: list[int] = []
    offset = 0
    carried = 0  # the wait of an empty piece goes to the next write
    for p in parts:
        if not p.data:
            carried += p.wait_ms
            continue
        for i, cut in enumerate([0, *_cuts_in(s, len(p.data))]):
            drip = s.drip_ms if starts else 0
            waits.append(drip + (carried + p.wait_ms if i == 0 else 0))
            starts.append(offset + cut)
        carried = 0
        offset += len(p.data)
    return starts, waits


def _chunk_starts(s: Scenario, parts: list[Piece], size: int) -> list[int]:
    if s.chunk:
        if -(-size // s.chunk) > MAX_CHUNKS:
            raise ValueError(f"chunk={s.chunk} would make more than {MAX_CHUNKS} chunks")
        return list(range(0, size, s.chunk))
    starts, offset = [], 0
    for p in parts:
        if p.data:
            starts.append(offset)
        offset += len(p.data)
    return starts


def _frame(
    body: bytes, starts: list[int], chunk_starts: list[int], ext: str, base: int
) -> tuple[bytearray, list[int]]:
    """The body framed in chunks (when ``chunk_starts``) and the wire offset where each
    write ends (``base``: the head's size, which comes first)."""
    wire = bytearray()
    cuts: list[int] = []
    size = len(body)
    if not chunk_starts:
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else size
            wire += body[start:end]
            cuts.append(base + len(wire))
        return wire, cuts
    chunk_set = set(chunk_starts)
    chunk_end = {a: b for a, b in zip(chunk_starts, [*chunk_starts[1:], size], strict=True)}
    write_set = set(starts)
    suffix = f";{ext}".encode("latin-1") if ext else b""
    points = sorted(chunk_set | write_set | {size})
    for a, b in pairwise(points):
        if a in write_set and a != starts[0]:
            cuts.append(base + len(wire))
        if a in chunk_set:
            wire += b"%x%b\r\n" % (chunk_end[a] - a, suffix)
        wire += body[a:b]
        if b in chunk_set or b == size:
            wire += b"\r\n"
    if starts:
        cuts.append(base + len(wire))
    return wire, cuts

"""The body of a scripted scenario (``wire.scenario``) as timed pieces: each event's
fields in the order asked for, its line endings, heartbeats through silences, a BOM, a
partial event; and what a conforming client must make of it (WHATWG HTML, "Server-sent
events" §9.2.6), for tests on either side. Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .scenario import DONE, HEARTBEAT, LINE_ENDINGS, ORDERS, Scenario

BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class Piece:
    """Body bytes written after a wait; ``kind`` is event, comment, done, partial or bom."""

    wait_ms: int
    data: bytes
    kind: str
    number: int = 0  # the event's number (its id), for events and a partial one


class _Lines:
    """Ends lines as the scenario says; with ``mixed``, LF, CRLF and CR in turn, except
    that a blank line after a CR never ends with LF alone (CR + LF would be one CRLF, and
    the blank line that dispatches the event would vanish)."""

    def __init__(self, endings: tuple[str, ...]) -> None:
        self._endings = endings
        self._count = 0
        self._after_cr = False

    def end(self, line: str) -> str:
        ending = self._endings[self._count % len(self._endings)]
        self._count += 1
        if self._after_cr and not line and ending == "\n":
            ending = "\r\n"
        self._after_cr = ending == "\r"
        return line + ending


def _field(s: Scenario, name: str, value: str) -> str:
    if not value:
        return f"{name}:"  # an empty value takes no space: ``id:`` resets the last id
    return f"{name}{': ' if s.space else ':'}{value}"


def _json_lines(members: list[str], count: int) -> list[str]:
    """A JSON object over ``count`` lines, cut only between members (a line break is
    whitespace to JSON, so the joined data still parses)."""
    count = max(1, min(count, len(members)))
    per = -(-len(members) // count)
    groups = [members[i : i + per] for i in range(0, len(members), per)]
    lines = [",".join(g) for g in groups]
    lines = [line + "," for line in lines[:-1]] + lines[-1:]
    lines[0] = "{" + lines[0]
    lines[-1] += "}"
    return lines


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def data_lines(s: Scenario, n: int) -> list[str]:
    """The ``data`` lines of event ``n``: joined with LF, what a client must dispatch."""
    count = s.data_lines
    if s.payload == "empty":
        return [""] * count
    if s.payload == "json":
        members = [f'"n":{n}', f'"text":{_compact(f"event {n}")}']
        return _json_lines(members, count)
    if s.payload == "openai":
        delta = {"role": "assistant", "content": ""} if n == 1 else {}
        delta["content"] = f"event {n} "
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        members = [
            '"id":"chatcmpl-sseserver-test"',
            '"object":"chat.completion.chunk"',
            '"created":0',
            '"model":"sseserver-test"',
            f'"choices":[{_compact(choice)}]',
        ]
        return _json_lines(members, count)
    word = "événement ✓ 日本 🎉" if s.payload == "unicode" else "event"
    if count == 1:
        lines = [f"{word} {n}"]
    else:
        lines = [f"{word} {n}, line {j}" for j in range(1, count + 1)]
    return [line.ljust(s.size, ".") for line in lines]


def expected_data(s: Scenario, n: int) -> str:
    """What a conforming client dispatches as event ``n``'s data."""
    return "\n".join(data_lines(s, n))


def _event_text(s: Scenario, n: int, lines: _Lines) -> str:
    order = ORDERS[(n - 1) % len(ORDERS)] if s.order == "rotate" else s.order
    fields: list[str] = []
    if s.unknown:
        fields += [_field(s, "x-unknown", "ignored"), "no-colon-ignored"]
    for letter in order:
        if letter == "i" and n in s.id_reset:
            fields.append("id:")
        elif letter == "i" and n in s.id_nul:
            fields.append(_field(s, "id", f"{n}\0nul"))
        elif letter == "i" and s.ids:
            fields.append(_field(s, "id", str(n)))
        elif letter == "e" and s.event:
            fields.append(_field(s, "event", s.event))
        elif letter == "r" and s.retry is not None:
            fields.append(_field(s, "retry", s.retry))
        elif letter == "d":
            fields += [_field(s, "data", d) for d in data_lines(s, n)]
    out = []
    for line in fields:
        if s.comments:
            out.append(lines.end(":" + (" note" if s.space else "note")))
        out.append(lines.end(line))
    out.append(lines.end(""))
    return "".join(out)


def _heartbeat(s: Scenario, lines: _Lines) -> str:
    return lines.end(":" + (" " if s.space else "") + HEARTBEAT) + lines.end("")


def last_event(s: Scenario) -> int:
    """The number of the last whole event this response sends."""
    if s.drop_after:
        return min(s.events, s.after + s.drop_after)
    return s.events


def pieces(s: Scenario) -> list[Piece]:
    """The body as timed pieces, in order; ``Piece.wait_ms`` is the silence before each
    (heartbeat comments fill silences when ``heartbeat_ms`` is set)."""
    lines = _Lines(LINE_ENDINGS[s.line_endings])
    out: list[Piece] = []
    if s.bom:
        out.append(Piece(0, BOM.encode(), "bom"))
    last = last_event(s)
    pending_wait = 0

    def wait_then(piece_wait: int) -> int:
        """Heartbeats through a silence; the part of it left before the next piece."""
        if not s.heartbeat_ms:
            return piece_wait
        left = piece_wait
        while left > s.heartbeat_ms:
            out.append(Piece(s.heartbeat_ms, _heartbeat(s, lines).encode(), "comment"))
            left -= s.heartbeat_ms
        return left

    for n in range(s.after + 1, last + 1):
        wait = wait_then(pending_wait + (s.interval_ms if n > s.after + 1 else 0))
        out.append(Piece(wait, _event_text(s, n, lines).encode(), "event", n))
        pending_wait = s.pause_ms if n == s.pause_after else 0
    if s.payload == "openai" and last == s.events and not s.partial:
        wait = wait_then(pending_wait)
        pending_wait = 0
        text = "".join(lines.end(x) for x in (_field(s, "data", DONE), ""))
        out.append(Piece(wait, text.encode(), "done"))
    if s.partial:
        wait = wait_then(pending_wait)
        pending_wait = 0
        whole = _event_text(s, last + 1, lines).encode()
        # Never the whole event: it stops before the line end of its closing blank line.
        cut = min(s.partial, len(whole) - _final_ending(whole))
        out.append(Piece(wait, whole[:cut], "partial", last + 1))
    if pending_wait:
        wait = wait_then(pending_wait)
        out.append(Piece(wait, b"", "end"))
    return out


def _final_ending(event: bytes) -> int:
    """The length of the line end of an event's closing blank line: the client
    dispatches as soon as its first byte (CR or LF) arrives."""
    if event.endswith(b"\r\n"):
        return 2
    return 1


@dataclass(frozen=True, slots=True)
class Expected:
    """One event as a conforming client dispatches it (``EventSource``'s ``type``,
    ``data`` and ``lastEventId``)."""

    type: str
    data: str
    last_event_id: str


def expected_events(s: Scenario) -> list[Expected]:
    """What a client that follows the standard dispatches from a 200 answer to ``s``: the
    whole events only (a partial one is discarded at the end of the stream), ``id:`` empty
    resetting the last event id, an id holding NUL ignored, comments and unknown fields
    ignored; the data whatever the line endings, BOM, cuts and chunks."""
    last_id = str(s.after) if s.after else ""
    out = []
    last = last_event(s)
    for n in range(s.after + 1, last + 1):
        if n in s.id_reset:
            last_id = ""
        elif n not in s.id_nul and s.ids:
            last_id = str(n)
        out.append(Expected(s.event or "message", expected_data(s, n), last_id))
    if s.payload == "openai" and last == s.events and not s.partial:
        out.append(Expected("message", DONE, last_id))
    return out


def expected_retry(s: Scenario) -> int | None:
    """The reconnection time a client takes from ``retry`` (ASCII digits only, else the
    field is ignored), once an event carrying it has been read."""
    value = s.retry
    if value and value.isascii() and value.isdigit() and last_event(s) > s.after:
        return int(value)
    return None

"""sseserver.wire.sse: exact wire bytes (tables, like h11's SIMPLE_CASES), refusals, and
round-trip properties through an independent WHATWG parser (tests/support/sse_parser.py),
which is itself checked here against the standard's own examples."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sseserver.wire.sse import ServerSentEvent, encode_comment, encode_event, encode_retry
from tests.support.sse_parser import Event, SSEParser, parse

# --------------------------------------------------------------------------------------
# Exact bytes
# --------------------------------------------------------------------------------------

# (keyword arguments of encode_event, exact wire bytes)
SIMPLE_CASES: list[tuple[dict[str, Any], bytes]] = [
    ({"data": "hello"}, b"data: hello\n\n"),
    # Empty data is still an event: the parser's data buffer becomes "\n", not "".
    ({"data": ""}, b"data: \n\n"),
    ({"data": "\n"}, b"data: \ndata: \n\n"),
    ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
    ({"data": "a\r\nb"}, b"data: a\ndata: b\n\n"),
    # A lone CR is a line end for the parser, so it must split too.
    ({"data": "a\rb"}, b"data: a\ndata: b\n\n"),
    ({"data": "a\r\n\rb"}, b"data: a\ndata: \ndata: b\n\n"),
    ({"data": "a\n\rb"}, b"data: a\ndata: \ndata: b\n\n"),
    ({"data": "end\r"}, b"data: end\ndata: \n\n"),
    ({"data": "\r\n"}, b"data: \ndata: \n\n"),
    # Only CR/LF split: U+2028, NEL, FF and VT stay inside the line (str.splitlines would
    # split them and change the data).
    ({"data": "a\u2028b\x85c\x0cd\x0be"}, "data: a\u2028b\x85c\x0cd\x0be\n\n".encode()),
    ({"data": "héllo ✓ 😀"}, "data: héllo ✓ 😀\n\n".encode()),
    # One space always follows the colon, so a leading space of the value survives.
    ({"data": " lead"}, b"data:  lead\n\n"),
    ({"data": "a: b"}, b"data: a: b\n\n"),
    ({"data": "x\x00y"}, b"data: x\x00y\n\n"),
    ({"data": "x", "event": "update"}, b"event: update\ndata: x\n\n"),
    ({"data": "x", "id": "42"}, b"id: 42\ndata: x\n\n"),
    ({"data": "x", "id": " 42"}, b"id:  42\ndata: x\n\n"),
    # An empty id resets the client's last event ID; an id alone dispatches nothing.
    ({"id": ""}, b"id: \n\n"),
    ({"id": "7"}, b"id: 7\n\n"),
    ({"retry": 0}, b"retry: 0\n\n"),
    ({"retry": 2000}, b"retry: 2000\n\n"),
    ({"comment": "ping"}, b": ping\n\n"),
    ({"comment": ""}, b":\n\n"),
    ({"comment": " x"}, b":  x\n\n"),
    ({"comment": "a\nb\r\nc\rd"}, b": a\n: b\n: c\n: d\n\n"),
    ({"comment": "a\n\nb"}, b": a\n:\n: b\n\n"),
    # Field order: comment, id, event, retry, data.
    (
        {"data": "d1\nd2", "event": "e", "id": "i", "retry": 5, "comment": "c"},
        b": c\nid: i\nevent: e\nretry: 5\ndata: d1\ndata: d2\n\n",
    ),
    # NUL in an event name is harmless: the parser keeps it (only id ignores NUL).
    ({"data": "x", "event": "a\x00b"}, b"event: a\x00b\ndata: x\n\n"),
]


@pytest.mark.parametrize(("kwargs", "expected"), SIMPLE_CASES)
def test_encode_event_bytes(kwargs: dict[str, Any], expected: bytes) -> None:
    assert encode_event(**kwargs) == expected
    assert ServerSentEvent(**kwargs).encode() == expected


def test_encode_comment_and_retry() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("ping") == b": ping\n\n"
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    assert encode_retry(2000) == b"retry: 2000\n\n"
    assert encode_retry(0) == b"retry: 0\n\n"


def test_server_sent_event_is_a_frozen_value() -> None:
    event = ServerSentEvent(data="x", id="1")
    assert event == ServerSentEvent(data="x", id="1")
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]


# (keyword arguments, the message ValueError must match)
REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"data": "x", "id": "a\nb"}, "line break"),
    ({"data": "x", "id": "a\rb"}, "line break"),
    ({"data": "x", "id": "a\r\nb"}, "line break"),
    ({"data": "x", "id": "\n"}, "line break"),
    ({"data": "x", "id": "a\x00b"}, "NUL"),
    ({"data": "x", "id": "\x00"}, "NUL"),
    ({"data": "x", "event": "a\nb"}, "line break"),
    ({"data": "x", "event": "a\r"}, "line break"),
    ({"data": "x", "event": "\r\n"}, "line break"),
    ({"retry": -1}, "retry"),
    ({"data": "x", "retry": -2000}, "retry"),
    ({}, "at least one"),
]


@pytest.mark.parametrize(("kwargs", "match"), REFUSALS)
def test_encode_event_refuses(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_event(**kwargs)
    with pytest.raises(ValueError, match=match):
        ServerSentEvent(**kwargs).encode()


def test_encode_retry_refuses_negative() -> None:
    with pytest.raises(ValueError, match="retry"):
        encode_retry(-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": "\ud800"},
        {"data": "ok", "event": "\udfff"},
        {"id": "a\udc80"},
        {"comment": "\ud83d"},
    ],
)
def test_lone_surrogates_are_refused(kwargs: dict[str, Any]) -> None:
    # A lone surrogate has no UTF-8 encoding: the encoder lets UnicodeEncodeError (a
    # ValueError) escape rather than writing something the client would decode
    # differently.
    with pytest.raises(UnicodeEncodeError):
        encode_event(**kwargs)


# --------------------------------------------------------------------------------------
# Round trips through the WHATWG parser
# --------------------------------------------------------------------------------------

# Text rich in what matters to SSE: every line end, NUL, colons, spaces, a BOM, non-ASCII.
# Surrogates are left out (they cannot be UTF-8 encoded; see test_lone_surrogates_*).
_SPECIAL = st.sampled_from(["\r", "\n", "\r\n", "\x00", ":", " ", "\ufeff", "\u2028", "é", "😀"])
_CHAR = st.characters(exclude_categories=["Cs"])
TEXT = st.lists(st.one_of(_CHAR, _SPECIAL)).map("".join)
EVENT_NAMES = TEXT.map(lambda s: s.replace("\r", "").replace("\n", ""))
IDS = EVENT_NAMES.map(lambda s: s.replace("\x00", ""))
_BAD_EVENT_CHARS = st.sampled_from(["\r", "\n", "\r\n"])
_BAD_ID_CHARS = st.sampled_from(["\r", "\n", "\r\n", "\x00"])


def _normalise_line_ends(text: str) -> str:
    """What the parser gives back for ``text``: every CRLF, CR and LF becomes LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _split(payload: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(payload) + 1) for c in cuts} | {0, len(payload)})
    return [payload[a:b] for a, b in itertools.pairwise(points)]


def _feed_in_pieces(payload: bytes, cuts: list[int]) -> tuple[SSEParser, list[Event]]:
    parser = SSEParser()
    events: list[Event] = []
    for piece in _split(payload, cuts):
        events.extend(parser.feed(piece))
    return parser, events


@given(
    data=TEXT,
    event=st.none() | EVENT_NAMES,
    id=st.none() | IDS,
    cuts=st.lists(st.integers(min_value=0)),
)
@example(data="a\r", event=None, id=None, cuts=[2, 3, 6, 7])  # the CR|LF split
@example(data="", event="", id="", cuts=[])
def test_event_round_trips(data: str, event: str | None, id: str | None, cuts: list[int]) -> None:
    payload = encode_event(data, event=event, id=id)
    parser, events = _feed_in_pieces(payload, cuts)
    assert events == [
        Event(type=event or "message", data=_normalise_line_ends(data), last_event_id=id or "")
    ]
    assert parser.last_event_id == (id or "")
    assert not parser.pending
    assert parse(payload) == events


@given(
    items=st.lists(st.tuples(TEXT, st.none() | IDS), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0)),
)
def test_stream_of_events_round_trips_and_ids_persist(
    items: list[tuple[str, str | None]], cuts: list[int]
) -> None:
    # An event without id inherits the last id sent: the parser's buffer is never reset.
    stream = b"".join(encode_event(data, id=id) for data, id in items)
    expected, last = [], ""
    for data, id in items:
        last = last if id is None else id
        expected.append(Event("message", _normalise_line_ends(data), last))
    parser, events = _feed_in_pieces(stream, cuts)
    assert events == expected
    assert parser.events == expected


@given(comment=TEXT, cuts=st.lists(st.integers(min_value=0)))
def test_comment_round_trips(comment: str, cuts: list[int]) -> None:
    parser, events = _feed_in_pieces(encode_comment(comment), cuts)
    assert events == []
    assert parser.comments == _normalise_line_ends(comment).split("\n")


@given(retry=st.integers(min_value=0, max_value=10**30))
def test_retry_round_trips(retry: int) -> None:
    parser = SSEParser()
    assert parser.feed(encode_retry(retry)) == []
    assert parser.retry == retry


@given(prefix=TEXT, bad=_BAD_ID_CHARS, suffix=TEXT)
def test_invalid_ids_are_always_refused(prefix: str, bad: str, suffix: str) -> None:
    with pytest.raises(ValueError):
        encode_event("x", id=prefix + bad + suffix)


@given(prefix=TEXT, bad=_BAD_EVENT_CHARS, suffix=TEXT)
def test_invalid_event_names_are_always_refused(prefix: str, bad: str, suffix: str) -> None:
    with pytest.raises(ValueError):
        encode_event("x", event=prefix + bad + suffix)


@given(prefix=TEXT, surrogate=st.characters(categories=["Cs"]), suffix=TEXT)
def test_data_with_surrogates_is_always_refused(prefix: str, surrogate: str, suffix: str) -> None:
    with pytest.raises(UnicodeEncodeError):
        encode_event(prefix + surrogate + suffix)


# --------------------------------------------------------------------------------------
# The oracle itself: tests/support/sse_parser.py against the WHATWG standard's examples and rules
# --------------------------------------------------------------------------------------


def _feed_every_split(stream: bytes) -> list[tuple[SSEParser, list[Event]]]:
    """Parse ``stream`` whole, byte by byte, and cut in two at every position."""
    results = [_feed_in_pieces(stream, []), _feed_in_pieces(stream, list(range(len(stream))))]
    results += [_feed_in_pieces(stream, [cut]) for cut in range(len(stream) + 1)]
    return results


WHATWG_EXAMPLES: list[tuple[bytes, list[Event]]] = [
    (
        b"data: This is the first message.\n\n"
        b"data: This is the second message, it\n"
        b"data: has two lines.\n\n"
        b"data: This is the third message.\n\n",
        [
            Event("message", "This is the first message.", ""),
            Event("message", "This is the second message, it\nhas two lines.", ""),
            Event("message", "This is the third message.", ""),
        ],
    ),
    (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [Event("add", "73857293", ""), Event("remove", "2153", ""), Event("add", "113411", "")],
    ),
    (b"data: YHOO\ndata: +2\ndata: 10\n\n", [Event("message", "YHOO\n+2\n10", "")]),
    (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n",
        [
            Event("message", "first event", "1"),
            Event("message", "second event", ""),
            Event("message", " third event", ""),
        ],
    ),
    # The last block has no blank line after it, so it is never dispatched.
    (b"data\n\ndata\ndata\n\ndata:", [Event("message", "", ""), Event("message", "\n", "")]),
    (b"data:test\n\ndata: test\n\n", [Event("message", "test", "")] * 2),
]


@pytest.mark.parametrize(("stream", "expected"), WHATWG_EXAMPLES)
def test_parser_whatwg_examples(stream: bytes, expected: list[Event]) -> None:
    for _, events in _feed_every_split(stream):
        assert events == expected


@pytest.mark.parametrize("line_end", [b"\n", b"\r", b"\r\n"])
def test_parser_line_ends_at_every_split(line_end: bytes) -> None:
    stream = b"\xef\xbb\xbfid: 1\ndata: a\ndata: \xc3\xa9\n\n".replace(b"\n", line_end)
    for parser, events in _feed_every_split(stream):
        assert events == [Event("message", "a\né", "1")]
        assert not parser.pending


def test_parser_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # Were this LF taken as a blank line, "a" would be dispatched alone here.
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [Event("message", "a\nb", "")]
    assert parser.feed(b"\n") == []  # the LF of the CRLF that ended the blank line


def test_parser_dispatches_at_a_final_cr_without_waiting() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == [Event("message", "a", "")]
    assert parser.feed(b"data: b\r\r") == [Event("message", "b", "")]


def test_parser_strips_one_bom_only_at_the_start() -> None:
    bom = b"\xef\xbb\xbf"
    assert parse(bom + b"data: x\n\n") == [Event("message", "x", "")]
    # A second BOM makes the first field name "\ufeffdata", an unknown field.
    assert parse(bom + bom + b"data: x\n\n") == []
    assert parse(b"data: x\n\n" + bom + b"data: y\n\n") == [Event("message", "x", "")]
    assert parse(b"data: " + bom + b"\n\n") == [Event("message", "\ufeff", "")]
    parser = SSEParser()
    for byte in bom + b"data: x\n\n":
        parser.feed(bytes([byte]))
    assert parser.events == [Event("message", "x", "")]


def test_parser_replaces_invalid_utf8() -> None:
    assert parse(b"data: a\xffb\n\n") == [Event("message", "a\ufffdb", "")]


def test_parser_field_rules() -> None:
    stream = (
        b"Data: ignored, names are case-sensitive\n"
        b"unknown: ignored\n"
        b"data:no space\n"
        b"data:  two spaces\n"
        b"data\n"
        b"data: colon: inside\n"
        b"event: first\n"
        b"event: second\n"
        b"\n"
    )
    assert parse(stream) == [
        Event("second", "no space\n two spaces\n\ncolon: inside", ""),
    ]


def test_parser_empty_event_type_means_message() -> None:
    assert parse(b"event:\ndata: x\n\n") == [Event("message", "x", "")]
    assert parse(b"event\ndata: x\n\n") == [Event("message", "x", "")]


def test_parser_event_type_does_not_leak_into_the_next_event() -> None:
    assert parse(b"event: a\ndata: 1\n\ndata: 2\n\n") == [
        Event("a", "1", ""),
        Event("message", "2", ""),
    ]
    # Nor from a block that dispatched nothing.
    assert parse(b"event: a\n\ndata: 2\n\n") == [Event("message", "2", "")]


def test_parser_last_event_id_rules() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 1\ndata: a\n\n") == [Event("message", "a", "1")]
    assert parser.feed(b"data: b\n\n") == [Event("message", "b", "1")]  # persists
    assert parser.feed(b"id: 2\n\n") == []  # no data: nothing fires...
    assert parser.last_event_id == "2"  # ...but the resume point moves
    assert parser.feed(b"id: 3\x00\ndata: c\n\n") == [Event("message", "c", "2")]  # NUL: ignored
    assert parser.feed(b"id\ndata: d\n\n") == [Event("message", "d", "")]  # reset
    assert parser.feed(b"data: e\nid: 5\n\n") == [Event("message", "e", "5")]  # order in block
    parser.feed(b"id: 6\ndata: unfinished\n")
    assert parser.last_event_id == "5"  # an id takes effect at dispatch only


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"3000", 3000),
        (b"0", 0),
        (b"007", 7),
        (b" 3000", 3000),  # the one leading space is stripped first
        (b"", None),
        (b"-1", None),
        (b"1.5", None),
        (b"3000 ", None),
        (b"  3000", None),
        (b"1e3", None),
        ("١٢".encode(), None),  # digits, but not ASCII digits
        ("²".encode(), None),
    ],
)
def test_parser_retry_needs_ascii_digits(value: bytes, expected: int | None) -> None:
    parser = SSEParser()
    assert parser.feed(b"retry:" + value + b"\n\n") == []
    assert parser.retry == expected


def test_parser_invalid_retry_keeps_the_previous_value() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 1000\n\nretry: soon\n\n")
    assert parser.retry == 1000


def test_parser_records_comments() -> None:
    parser = SSEParser()
    assert parser.feed(b": ping\n\n:\n\n:  two\n:no space\n: ping\r\n\r\n") == []
    assert parser.comments == ["ping", "", " two", "no space", "ping"]


def test_parser_discards_an_unfinished_event_at_eof() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [Event("message", "a", "")]
    assert parser.pending
    assert parser.feed_eof() == []
    assert not parser.pending
    parser = SSEParser()
    parser.feed(b"data: a\n\ndata: partial line")
    assert parser.pending
    parser = SSEParser()
    parser.feed(b"data: a\n\n: ping\n\n")
    assert not parser.pending

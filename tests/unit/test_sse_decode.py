"""``wire.sse_decode.EventDecoder`` (how the lean client reads a streamed answer) against
the ``openai`` SDK's own ``SSEDecoder`` as the oracle, over arbitrary bytes cut at arbitrary
places: the same events, and a line that is not UTF-8 failing at the same point."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from hypothesis import example, given
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from sseserver.wire.sse_decode import EventDecoder

Decoded = tuple[list[tuple[str | None, str]], bool]  # (events, raised UnicodeDecodeError)


def cut(payload: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c % (len(payload) + 1) for c in cuts} | {0, len(payload)})
    return [payload[a:b] for a, b in itertools.pairwise(points)]


def sdk_decode(pieces: list[bytes]) -> Decoded:
    events: list[tuple[str | None, str]] = []
    try:
        for sse in SSEDecoder().iter_bytes(iter(pieces)):
            events.append((sse.event, sse.data))
    except UnicodeDecodeError:
        return events, True
    return events, False


def our_decode(pieces: list[bytes]) -> Decoded:
    decoder = EventDecoder()
    events: list[tuple[str | None, str]] = []
    try:
        for piece in pieces:
            events.extend(decoder.feed(piece))
        decoder.close()
    except UnicodeDecodeError:
        return events, True
    return events, False


LINES = st.sampled_from(
    [
        b"data: {}",
        b"data:x",
        b"data",
        b"data: [DONE]",
        b"event: thread.run",
        b"event:",
        b"id: 7",
        b"id: a\x00b",
        b"retry: 10",
        b"retry: soon",
        b": keep-alive",
        b":",
        b"",
        b"other: field",
        b"data: caf\xc3\xa9",
        b"data: \xff",
        b": \xfe",
    ]
)
ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(
    lines=st.lists(st.tuples(LINES, ENDS), max_size=12),
    tail=st.binary(max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
@example(lines=[(b"data: a", b"\r\n"), (b"", b"\r\n")], tail=b"", cuts=[8])  # CR|LF split
@example(lines=[(b"data: a", b"\r"), (b"", b"\r")], tail=b"\n", cuts=[8])  # CR then LF alone
@example(lines=[(b"id: 1", b"\n"), (b"", b"\n"), (b"", b"\n")], tail=b"", cuts=[])
@example(lines=[(b"data: ok", b"\n"), (b"", b"\n")], tail=b"\xff", cuts=[])  # bad last line
def test_event_decoder_matches_the_sdk(
    lines: list[tuple[bytes, bytes]], tail: bytes, cuts: list[int]
) -> None:
    payload = b"".join(line + end for line, end in lines) + tail
    pieces = cut(payload, cuts)
    assert our_decode(pieces) == sdk_decode(pieces)


@given(payload=st.binary(max_size=64), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_event_decoder_matches_the_sdk_on_any_bytes(payload: bytes, cuts: list[int]) -> None:
    pieces = cut(payload, cuts)
    assert our_decode(pieces) == sdk_decode(pieces)


def test_event_decoder_stops_decoding_where_its_consumer_stops() -> None:
    # The SDK decodes a line only when the events before it were taken: a bad line after
    # [DONE] in the same read is never seen. So is it here.
    decoder = EventDecoder()
    events = decoder.feed(b"data: [DONE]\n\ndata: \xff\n\n")
    assert next(events) == (None, "[DONE]")

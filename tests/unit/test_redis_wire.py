"""The Redis hub's entries (SPEC §8): the header ``encode_entry`` builds by hand is the one
``json.dumps`` would write, byte for byte (instances of different versions read each
other's entries), and ``decode_entry`` gives back what went in."""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from sseserver.hub.redis_wire import decode_entry, encode_entry

text = st.text(min_size=1, max_size=40)


@given(
    origin=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    sequence=st.integers(min_value=0, max_value=2**63),
    topics=st.lists(text, min_size=1, max_size=4).map(tuple),
    event_id=text,
    private=st.booleans(),
    final=st.booleans(),
    owner=st.none() | text,
    firehose=st.booleans(),
)
@example(
    origin="0" * 32,
    sequence=1,
    topics=('https://example.com/books/"1"\\é',),
    event_id='a"b\\c\nd\u2028e😀',
    private=True,
    final=True,
    owner="ü\x00",
    firehose=True,
)
def test_the_header_is_json_dumps_and_decodes_back(
    origin: str,
    sequence: int,
    topics: tuple[str, ...],
    event_id: str,
    private: bool,
    final: bool,
    owner: str | None,
    firehose: bool,
) -> None:
    sse = b"id: x\ndata: y\n\n"
    raw = encode_entry(
        origin,
        sequence,
        topics,
        event_id,
        sse,
        private=private,
        final=final,
        owner=owner,
        firehose=firehose,
    )
    header: dict[str, object] = {"o": origin, "s": sequence, "t": topics, "i": event_id}
    for key, on in (("p", private), ("f", final), ("h", firehose)):
        if on:
            header[key] = 1
    if owner is not None:
        header["w"] = owner
    order = ["o", "s", "t", "i", "p", "f", "w", "h"]
    header = {k: header[k] for k in order if k in header}
    assert raw == json.dumps(header, separators=(",", ":")).encode() + b"\n" + sse
    entry = decode_entry(raw)
    assert (entry.origin, entry.sequence, entry.topics, entry.event_id, entry.sse) == (
        origin,
        sequence,
        topics,
        event_id,
        sse,
    )
    assert (entry.private, entry.final, entry.owner, entry.firehose) == (
        private,
        final,
        owner,
        firehose,
    )

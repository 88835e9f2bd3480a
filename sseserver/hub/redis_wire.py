"""How the Redis hub lays topics out in Redis and what its entries carry.

Each topic is a stream of its own (its history) and a sharded pub/sub channel (its live
updates), named by a digest of the topic inside a hash tag: the two share one Redis
Cluster slot, so one script call appends to the stream and publishes on the channel,
and topics spread over every shard. Updates published through Mercure also go to a
firehose (a stream and channel like a topic's) for readers whose selectors are patterns.

An entry (the stream's field ``m``, and the channel's message after the entry id) is a
one-line JSON header and the event's SSE bytes as encoded once by the publisher: readers
neither encode it again nor keep another copy of its text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

PREFIX = "sseserver:"
FIREHOSE = "{firehose}"  # the key-space name of the all-topics stream and channel
ENTRY_FIELD = "m"

# For each stream KEYS[i], with ARGV[4i-3 .. 4i]: XADD of the entry (trimmed to about
# ARGV[4i-3] entries) and SPUBLISH of it on channel ARGV[4i-1], with the stream id in
# front of the message so that readers order live updates against the history they
# load; then the stream's idle expiry (ARGV[4i] ms) is pushed back. On a cluster a call
# holds one stream (a stream and its channel share a slot); on one redis-server, where a
# script may touch keys of any slot, up to 128: one call per write instead of one per
# entry costs the instance and Redis less. An entry Redis refuses (WRONGTYPE, OOM) is
# skipped, the others written; the answer lists only those, its position and Redis's
# message in pairs (empty when all went in).
APPEND_SCRIPT = """
local refused = {}
for i = 1, #KEYS do
  local b = (i - 1) * 4
  local entry = ARGV[b + 2]
  local ok, id = pcall(redis.call, 'XADD', KEYS[i], 'MAXLEN', '~', ARGV[b + 1], '*', 'm', entry)
  if ok then
    redis.call('SPUBLISH', ARGV[b + 3], id .. ' ' .. entry)
    redis.call('PEXPIRE', KEYS[i], ARGV[b + 4])
  else
    refused[#refused + 1] = i
    refused[#refused + 1] = type(id) == 'table' and id.err or tostring(id)
  end
end
return refused
"""


@lru_cache(maxsize=65536)
def _slot_tag(topic: str) -> str:
    """A short, fixed-size hash tag for ``topic`` (topics are URLs of any length)."""
    return "{" + hashlib.blake2b(topic.encode(), digest_size=10).hexdigest() + "}"


def stream_key(topic: str | None) -> str:
    """The stream holding ``topic``'s history (None: the firehose)."""
    return f"{PREFIX}{FIREHOSE if topic is None else _slot_tag(topic)}:s"


def channel_of(topic: str | None) -> str:
    """The sharded channel carrying ``topic``'s live updates (None: the firehose)."""
    return f"{PREFIX}{FIREHOSE if topic is None else _slot_tag(topic)}:c"


@dataclass(slots=True)
class Entry:
    """One decoded entry: an update or, with ``gap`` set, a count of updates that never
    reached Redis. ``origin`` and ``sequence`` name it uniquely (an update written to
    several topics and the firehose is one entry in each)."""

    origin: str
    sequence: int
    topics: tuple[str, ...]
    event_id: str = ""
    sse: bytes = b""
    private: bool = False
    final: bool = False
    owner: str | None = None
    firehose: bool = False  # a copy went to the firehose too
    gap: int = 0


_ascii_string = json.encoder.encode_basestring_ascii  # the C encoder json.dumps uses
_compact = json.JSONEncoder(separators=(",", ":")).encode


@lru_cache(maxsize=4096)
def _topics_json(topics: tuple[str, ...]) -> str:
    return _compact(topics)


def encode_entry(
    origin: str,
    sequence: int,
    topics: tuple[str, ...],
    event_id: str,
    sse: bytes,
    *,
    private: bool = False,
    final: bool = False,
    owner: str | None = None,
    firehose: bool = False,
) -> bytes:
    """The entry: its header, ``json.dumps`` of ``{"o", "s", "t", "i"[, "p", "f", "w",
    "h"]}`` compact, byte for byte, built without it (once per token and topic, where
    ``json.dumps`` with options costs a new encoder each call), then the SSE bytes."""
    head = (
        f'{{"o":{_ascii_string(origin)},"s":{sequence:d},"t":{_topics_json(topics)},'
        f'"i":{_ascii_string(event_id)}'
    )
    if private:
        head += ',"p":1'
    if final:
        head += ',"f":1'
    if owner is not None:
        head += ',"w":' + _ascii_string(owner)
    if firehose:
        head += ',"h":1'
    return (head + "}\n").encode() + sse


def encode_gap(origin: str, sequence: int, topics: tuple[str, ...], missed: int) -> bytes:
    header = {"o": origin, "s": sequence, "t": topics, "gap": missed}
    return _compact(header).encode() + b"\n"


def decode_entry(raw: bytes) -> Entry:
    """Raises ValueError (or KeyError, TypeError) for an entry this hub did not write."""
    head, sep, sse = raw.partition(b"\n")
    if not sep:
        raise ValueError("no header line")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    topics = tuple(header["t"])
    origin = header["o"]
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise ValueError("bad topics")
    sequence = header.get("s", 0)
    if not isinstance(origin, str) or not isinstance(sequence, int):
        raise ValueError("bad origin")
    gap = header.get("gap", 0)
    if gap:
        if not isinstance(gap, int) or gap < 0:
            raise ValueError("bad gap")
        return Entry(origin, sequence, topics, gap=gap)
    event_id = header["i"]
    owner = header.get("w")
    if not isinstance(event_id, str) or not event_id or not sse:
        raise ValueError("bad id or event")
    if owner is not None and not isinstance(owner, str):
        raise ValueError("bad owner")
    return Entry(
        origin,
        sequence,
        topics,
        event_id,
        sse,
        private=header.get("p") == 1,
        final=header.get("f") == 1,
        owner=owner,
        firehose=header.get("h") == 1,
    )


def split_message(data: bytes) -> tuple[str, bytes]:
    """A channel message: (stream id, entry). Raises ValueError when malformed."""
    entry_id, sep, raw = data.partition(b" ")
    ms, dash, seq = entry_id.partition(b"-")
    if not sep or not dash or not ms.isdigit() or not seq.isdigit():
        raise ValueError("no stream id")
    return entry_id.decode("ascii"), raw


def id_after(entry_id: str, last: str) -> bool:
    """Whether stream id ``entry_id`` comes after ``last`` (``ms-seq`` compared as numbers)."""
    ms, _, seq = entry_id.partition("-")
    last_ms, _, last_seq = last.partition("-")
    return (int(ms), int(seq or 0)) > (int(last_ms), int(last_seq or 0))

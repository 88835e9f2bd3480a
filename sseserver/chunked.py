"""HTTP/1.1 chunked framing (RFC 9112 §7.1), written by hand so that one event is framed
once and the same bytes go to every connection.

h11 writes the response head and the ``0\\r\\n\\r\\n`` terminator; we write the chunks in
between (h11's chunked writer keeps no state, so the two interleave safely — a test pins
this against h11's own output).
"""

from __future__ import annotations

from dataclasses import dataclass

LAST_CHUNK = b"0\r\n\r\n"


def frame(data: bytes | bytearray | memoryview) -> bytes:
    """One chunk holding ``data``; empty input gives ``b""``, never a zero-length chunk
    (``0\\r\\n\\r\\n`` would end the body)."""
    size = len(data)
    if not size:
        return b""
    return b"".join((b"%x\r\n" % size, data, b"\r\n"))


@dataclass(frozen=True, slots=True)
class Frame:
    """A payload ready for any connection: ``raw`` for close-delimited HTTP/1.0 bodies,
    ``chunked`` for HTTP/1.1. Built once, written to many."""

    raw: bytes
    chunked: bytes

    @classmethod
    def of(cls, payload: bytes) -> Frame:
        return cls(payload, frame(payload))

    def __len__(self) -> int:
        return len(self.raw)

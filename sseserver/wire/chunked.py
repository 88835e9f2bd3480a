"""HTTP/1.1 chunked framing (RFC 9112 §7.1), written by hand so that one event is framed
once and the same bytes go to every connection.

h11 writes the response head and the ``0\\r\\n\\r\\n`` terminator; we write the chunks in
between (h11's chunked writer keeps no state, so the two interleave safely — a test pins
this against h11's own output).
"""

from __future__ import annotations

LAST_CHUNK = b"0\r\n\r\n"


def frame(data: bytes | bytearray | memoryview) -> bytes:
    """One chunk holding ``data``; empty input gives ``b""``, never a zero-length chunk
    (``0\\r\\n\\r\\n`` would end the body)."""
    size = len(data)
    if not size:
        return b""
    return b"".join((b"%x\r\n" % size, data, b"\r\n"))


class Frame:
    """A payload ready for any connection, built once and written to many: ``chunked``
    for HTTP/1.1, ``raw`` for close-delimited HTTP/1.0 bodies. ``raw`` is a view into
    ``chunked``, not a second copy of the bytes: hubs keep thousands of frames as
    history. (A frame joining several, which is never kept, carries its own ``raw``.)"""

    __slots__ = ("_raw", "chunked", "size")

    def __init__(self, chunked: bytes, size: int, raw: bytes | None = None) -> None:
        self.chunked = chunked
        self.size = size  # payload bytes (what ``raw`` holds)
        self._raw = raw

    @classmethod
    def of(cls, payload: bytes) -> Frame:
        return cls(frame(payload), len(payload))

    @classmethod
    def joined(cls, frames: list[Frame]) -> Frame:
        """Several frames as one write (each keeps its own chunk)."""
        raw = b"".join(f.raw for f in frames)
        return cls(b"".join(f.chunked for f in frames), len(raw), raw)

    @property
    def raw(self) -> bytes | memoryview:
        if self._raw is not None:
            return self._raw
        end = len(self.chunked) - 2  # the chunk's trailing CRLF
        return memoryview(self.chunked)[end - self.size : end]

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and bytes(self.raw) == bytes(other.raw)

    __hash__ = None  # type: ignore[assignment]

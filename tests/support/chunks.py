"""The one HTTP/1.1 chunked-body decoder of the tests, for tests that check the framing
themselves (h11 hides it): fed a whole body, or piece by piece as it arrives.

Strict, so that a framing mistake of the server fails the test that reads it: a chunk-size
line is hex digits and nothing else (no extensions, no white space), every chunk's data is
followed by CRLF, and the last chunk by CRLF alone (no trailers). Anything else raises
``ValueError`` as soon as the bytes that break the rule have arrived.
"""

from __future__ import annotations

HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
CRLF = b"\r\n"


class ChunkedDecoder:
    """Incremental and strict: ``feed(bytes)`` returns the payload bytes they complete
    (a chunk's data is passed on as it arrives, before the chunk is complete)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._at = 0  # offset in the body of the first byte of _buf (for error messages)
        self._left = 0  # data bytes of the current chunk still to come
        self._crlf = False  # the CRLF closing a chunk (or the last chunk) is still to come
        self.sizes: list[int] = []  # every chunk size read, the last chunk's 0 included
        self.pending = 0  # payload bytes passed on whose chunk is not complete yet
        self.done = False  # the last chunk and its CRLF have been read
        self.after = bytearray()  # bytes fed after the end of the body

    def feed(self, data: bytes | bytearray) -> bytes:
        if self.done:
            self.after += data
            return b""
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._left:
                take = min(self._left, len(self._buf))
                if not take:
                    break
                out += self._buf[:take]
                self._consume(take)
                self._left -= take
                self.pending += take
                self._crlf = self._left == 0
            elif self._crlf:
                if not CRLF.startswith(bytes(self._buf[:2])):
                    last = bool(self.sizes) and self.sizes[-1] == 0
                    raise ValueError(
                        "last chunk not followed by CRLF (or has trailers)"
                        if last
                        else f"chunk of size {self.sizes[-1]} not followed by CRLF "
                        f"at {self._at}: {bytes(self._buf[:20])!r}"
                    )
                if len(self._buf) < 2:
                    break
                self._consume(2)
                self._crlf = False
                self.pending = 0
                if self.sizes[-1] == 0:
                    self.done = True
                    self.after += self._buf
                    self._buf.clear()
            elif not self._size_line():
                break
        return bytes(out)

    def _size_line(self) -> bool:
        """Read a chunk-size line if it is complete (False: wait for more bytes)."""
        eol = self._buf.find(CRLF)
        line = self._buf if eol < 0 else self._buf[:eol]
        if eol < 0 and line.endswith(b"\r"):
            line = line[:-1]  # maybe the first half of the CRLF
        if any(c not in HEX_DIGITS for c in line) or (eol == 0):
            raise ValueError(f"bad chunk size line {bytes(line[:40])!r} at {self._at}")
        if eol < 0:
            return False
        size = int(line, 16)
        self.sizes.append(size)
        self._consume(eol + 2)
        self._left = size
        self._crlf = size == 0  # the last chunk: only its CRLF is still to come
        return True

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._at += n


def split_chunks(data: bytes) -> tuple[list[int], bytes, bytes]:
    """A whole chunked body: (chunk sizes, payload, bytes after the terminator). Raises
    ValueError on bad framing or a truncated body."""
    decoder = ChunkedDecoder()
    payload = decoder.feed(data)
    if not decoder.done:
        raise ValueError(f"truncated chunked body ({len(data)} bytes)")
    return decoder.sizes, payload, bytes(decoder.after)


def complete_chunks(data: bytes) -> bytes:
    """The payload of the complete chunks at the start of a body that may have been cut
    short (a connection closed mid-body); the framing of what did arrive is checked."""
    decoder = ChunkedDecoder()
    payload = decoder.feed(data)
    return payload[: len(payload) - decoder.pending]

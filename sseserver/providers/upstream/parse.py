"""Reading an HTTP/1.1 response, sans I/O: the head, then the body by its framing
(chunked, Content-Length, or to the close). Written by hand for the same reason the
server's chunk framing is: one pass over each network read, no copies beyond the
payload pieces handed on."""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included


class ResponseError(Exception):
    """The upstream's response does not follow HTTP/1.1."""


@dataclass(slots=True)
class Head:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    keep_alive: bool


def parse_head(raw: bytes) -> Head:
    """The status line and fields of ``raw`` (up to, not including, the blank line).

    Raises:
        ResponseError: malformed.
    """
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise ResponseError("undecodable response head") from exc
    lines = text.split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ResponseError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            raise ResponseError(f"bad header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    connection = headers.get("connection", "").lower()
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    return Head(int(code), reason, headers, keep_alive)


class BodyReader:
    """Turns the body's bytes into payload pieces. ``feed`` returns the pieces a read
    completes and the bytes left over past the body's end (a pipelined nothing, in
    practice: kept so the caller can refuse to reuse such a connection); ``done`` once
    the body is complete."""

    __slots__ = ("_buffer", "_chunked", "_remaining", "_state", "done")

    def __init__(self, head: Head, *, method: str = "GET") -> None:
        self.done = False
        self._buffer = b""
        self._state = "size"  # chunked: size -> data -> data_crlf -> ... -> trailer
        self._chunked = False
        self._remaining = -1  # -1: to the close
        status = head.status
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self._remaining = 0
            self.done = True
            return
        encoding = head.headers.get("transfer-encoding")
        if encoding is not None:
            codings = [c.strip().lower() for c in encoding.split(",")]
            if codings[-1] != "chunked":
                return  # read to the close (RFC 9112 §6.3)
            self._chunked = True
            return
        length = head.headers.get("content-length")
        if length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise ResponseError(f"bad Content-Length {length[:40]!r}")
            self._remaining = int(next(iter(values)))
            self.done = self._remaining == 0

    @property
    def until_close(self) -> bool:
        """The body ends when the connection does (no length, not chunked)."""
        return not self._chunked and self._remaining < 0

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """(payload pieces, bytes past the end of the body).

        Raises:
            ResponseError: bad chunk framing.
        """
        if self.done:
            return [], data
        if not self._chunked:
            if self._remaining < 0:
                return [data], b""
            if len(data) < self._remaining:
                self._remaining -= len(data)
                return [data], b""
            piece, extra = data[: self._remaining], data[self._remaining :]
            self._remaining = 0
            self.done = True
            return ([piece] if piece else []), extra
        return self._feed_chunked(data)

    def _feed_chunked(self, data: bytes) -> tuple[list[bytes], bytes]:
        if self._state == "size" and not self._buffer:
            # The common read of a stream: exactly one whole chunk (an event). Anything
            # else (several chunks, a part, extensions) takes the general path below.
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0 and _is_hex(data[:eol]):
                start = eol + 2
                stop = start + int(data[:eol], 16)
                if stop > start and len(data) == stop + 2 and data.endswith(b"\r\n"):
                    return [data[start:stop]], b""
        pieces: list[bytes] = []
        buf = self._buffer + data if self._buffer else data
        self._buffer = b""
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state == "data":
                take = min(self._remaining, end - pos)
                pieces.append(buf[pos : pos + take] if (pos or take != end) else buf)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data_crlf"
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise ResponseError("chunk line too long")
                self._buffer = buf[pos:]
                break
            line = buf[pos:eol]
            pos = eol + 2
            if state == "size":
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 16 or not _is_hex(size_text):
                    raise ResponseError(f"bad chunk size {line[:40]!r}")
                size = int(size_text, 16)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining = size
                    self._state = "data"
            elif state == "data_crlf":
                if line:
                    raise ResponseError("chunk data longer than its size")
                self._state = "size"
            else:  # trailer fields, until the blank line
                if not line:
                    self.done = True
                    return pieces, buf[pos:]
        return pieces, b""


_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _is_hex(text: bytes) -> bool:
    return not text.strip(_HEX_DIGITS)

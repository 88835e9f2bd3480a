"""A small blocking SSE client, standing in for "your client": the code a client author
would test with sseserver's pytest plugin (see ``test_tiny_client.py`` beside it).

It reads ``text/event-stream`` over ``http.client`` as the WHATWG standard says (one
leading BOM dropped; CR, LF and CRLF line ends; comments and unknown fields ignored; ``id``
with NUL ignored; only ASCII-digit ``retry`` taken; an unfinished event dropped at the
end) and reconnects with ``Last-Event-ID`` until the server answers 204.
"""

from __future__ import annotations

import codecs
import http.client
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Event:
    type: str
    data: str
    last_event_id: str


class StreamRefused(Exception):
    """The server answered something other than a 200 event stream (not 204)."""


class Parser:
    """Bytes in, events out; keeps the last event id and the reconnection time."""

    def __init__(self, last_event_id: str = "") -> None:
        self.last_event_id = last_event_id
        self.retry_ms: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._text = ""
        self._first = True
        self._after_cr = False
        self._id = last_event_id
        self._type = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if self._first and text:
            self._first = False
            text = text.removeprefix("\ufeff")
        if self._after_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across reads
        if text:
            self._after_cr = text.endswith("\r")
        self._text += text
        lines = self._text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._text = lines.pop()
        return [e for e in map(self._line, lines) if e is not None]

    def _line(self, line: str) -> Event | None:
        if not line:
            self.last_event_id = self._id
            data, self._data = self._data, []
            kind, self._type = self._type or "message", ""
            return Event(kind, "\n".join(data), self._id) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None


def read_events(url: str, *, max_connections: int = 20, timeout: float = 10.0) -> Iterator[Event]:
    """Every event of ``url``, across reconnects, until the server answers 204."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    last_id, retry_ms = "", 3000
    for _ in range(max_connections):
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        parser = Parser(last_id)
        try:
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            if resp.status == 204:
                return
            ctype = (resp.getheader("content-type") or "").split(";")[0].strip()
            if resp.status != 200 or ctype != "text/event-stream":
                raise StreamRefused(f"{resp.status} {ctype!r}")
            while chunk := resp.read1(65536):
                yield from parser.feed(chunk)
        except (OSError, http.client.HTTPException):
            pass  # the connection dropped: reconnect, as EventSource does
        finally:
            conn.close()
            last_id = parser.last_event_id
            retry_ms = parser.retry_ms if parser.retry_ms is not None else retry_ms
        time.sleep(retry_ms / 1000)
    raise StreamRefused(f"still streaming after {max_connections} connections")

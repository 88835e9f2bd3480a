"""Reading server-sent events from a byte stream, as the openai SDK reads them (its
``SSEDecoder``), for the clients of upstream APIs and for the relay that watches the
events it forwards. Pure: no I/O, no asyncio."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

_LINE_END = re.compile(rb"\r\n|\r|\n")
_DATA = b"data: "  # (6 bytes) the common line, read without the general field parse


class EventDecoder:
    """Server-sent events from network reads, as the openai SDK decodes them.

    ``feed`` is a generator so that, as in the SDK, a line is decoded only when the events
    before it have been taken: a consumer that stops at ``[DONE]`` never sees what follows.
    """

    __slots__ = ("_data", "_event", "_last_id", "_partial", "_retry", "_skip_lf")

    def __init__(self) -> None:
        self._partial = b""  # an unterminated last line
        self._skip_lf = False  # the last read ended in CR: a leading LF ends no line
        self._event: str | None = None
        self._data: list[str] = []
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> Iterator[tuple[str | None, str]]:
        """(event type or None, data) of each event that ``chunk`` completes.

        Raises:
            UnicodeDecodeError: a line is not UTF-8.
        """
        if not chunk:
            return
        whole = self.whole(chunk)
        if whole is not None:
            yield None, whole
            return
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            lines = _LINE_END.split(chunk)
            self._skip_lf = chunk[-1:] == b"\r"
        else:
            lines = chunk.split(b"\n")
        if self._partial:
            lines[0] = self._partial + lines[0]
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(_DATA):
                self._data.append(line[6:].decode())
            elif line:
                self._field(line.decode())
            elif self._event or self._data or self._last_id or self._retry is not None:
                event = self._event or None
                data = self._data[0] if len(self._data) == 1 else "\n".join(self._data)
                self._event, self._data, self._retry = None, [], None  # the id stays
                yield event, data

    def whole(self, chunk: bytes) -> str | None:
        """The data of ``chunk`` when it is exactly one event of one data line and
        nothing is pending (the common read of a stream), else None: ``feed`` reads the
        same chunk to the same event, only slower.

        Raises:
            UnicodeDecodeError: that line is not UTF-8.
        """
        if (
            chunk.startswith(_DATA)
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and not (self._partial or self._skip_lf or self._data or self._event)
            and self._retry is None
            and b"\r" not in chunk
        ):
            return chunk[6:-2].decode()
        return None

    def close(self) -> None:
        """The end of the body: an unterminated line ends no event, but must be UTF-8.

        Raises:
            UnicodeDecodeError: it is not.
        """
        self._partial.decode()

    def _field(self, line: str) -> None:
        if line[0] == ":":
            return  # a comment
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            with contextlib.suppress(ValueError):
                self._retry = int(value)

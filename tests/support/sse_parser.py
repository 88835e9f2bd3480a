"""A test-side Server-Sent Events parser, written from the WHATWG HTML standard
("Server-sent events" §9.2.5 "Parsing an event stream" and §9.2.6 "Interpreting an event
stream"), so that tests check our bytes the way a browser's ``EventSource`` reads them.

It is deliberately independent of ``sseserver.wire.sse``: sharing code with the encoder would
let one bug hide the other.

Usage::

    parser = SSEParser()
    for chunk in body_chunks:            # any split, even inside a UTF-8 sequence or a CRLF
        for event in parser.feed(chunk):
            ...                           # Event(type, data, last_event_id)
    parser.comments                       # comment lines seen (heartbeats: ["ping", ...])
    parser.retry                          # last valid ``retry:`` value in ms, or None

Or in one go: ``parse(body) -> list[Event]``.

What the standard asks, step by step (the numbers are the comments below):
1. The stream is UTF-8, decoded with replacement of invalid sequences; one leading BOM is
   stripped.
2. Lines end with CRLF, LF or CR. A CR is a complete line end by itself, so a line is
   processed as soon as its CR arrives; an LF that follows in the next chunk is then the
   second half of that CRLF and is skipped, not taken as an empty line.
3. An empty line dispatches the event. A line starting with ``:`` is a comment. Otherwise
   the field name is everything before the first ``:`` (the whole line if there is none,
   with an empty value), and the value is everything after it, minus ONE leading space.
4. ``event`` sets the type buffer; ``data`` appends value + LF to the data buffer; ``id``
   sets the last-event-ID buffer unless the value contains NUL; ``retry`` sets the
   reconnection time only if the value is ASCII digits only; any other field is ignored.
   Field names are case-sensitive.
5. Dispatch: the last-event-ID string takes the buffer's value (even when nothing is
   dispatched: an event of ``id:`` alone still moves the resume point), and the buffer is
   NOT reset, so later events inherit it. If the data buffer is empty, the data and type
   buffers are cleared and nothing is dispatched. Otherwise one trailing LF is removed,
   and an event of type ``message`` (or the type buffer, if not empty) is dispatched.
6. At end of stream, an incomplete event (no blank line yet) is discarded.

Not part of the standard, for tests' convenience: comments are recorded (value after the
colon, one leading space stripped, as for fields), and ``pending`` says whether the stream
has stopped in the middle of an event.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

__all__ = ["Event", "SSEParser", "parse"]

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event, as ``EventSource`` would hand it to a listener."""

    type: str
    data: str
    last_event_id: str


@dataclass(slots=True)
class SSEParser:
    """Incremental, spec-conformant event stream parser: ``feed(bytes) -> list[Event]``."""

    #: Reconnection time in ms from the last valid ``retry:`` field; ``None`` until one.
    retry: int | None = None
    #: The last event ID string (the value a reconnect sends as ``Last-Event-ID``).
    last_event_id: str = ""
    #: Every comment line seen, in order, without the colon and one leading space.
    comments: list[str] = field(default_factory=list)
    #: Every event dispatched so far, in order (``feed`` also returns the new ones).
    events: list[Event] = field(default_factory=list)

    _decoder: codecs.IncrementalDecoder = field(
        # (1) "UTF-8 decode": invalid sequences become U+FFFD rather than errors.
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        repr=False,
    )
    _started: bool = field(default=False, repr=False)  # a first character has been decoded
    _skip_lf: bool = field(default=False, repr=False)  # last chunk ended on a CR
    _line: list[str] = field(default_factory=list, repr=False)  # the unfinished line
    _data: list[str] = field(default_factory=list, repr=False)  # data buffer, as pieces
    _type: str = field(default="", repr=False)  # event type buffer
    _id_buffer: str = field(default="", repr=False)  # last event ID buffer
    _fields_seen: bool = field(default=False, repr=False)  # any line since the last dispatch

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Event]:
        """Parse the next bytes of the stream; return the events they complete."""
        text = self._decoder.decode(bytes(chunk))
        return self._feed_text(text)

    def feed_eof(self) -> list[Event]:
        """End of stream: (6) an unfinished event is discarded, never dispatched.

        Returns an empty list (kept for symmetry with ``feed``); check ``pending`` first to
        know whether something was dropped.
        """
        self._decoder.decode(b"", final=True)
        self._line.clear()
        self._reset_event_buffers()
        self._fields_seen = False
        return []

    @property
    def pending(self) -> bool:
        """True if the stream so far ends inside an event (a partial line, or fields not
        yet followed by a blank line)."""
        return bool(self._line) or self._fields_seen

    def _feed_text(self, text: str) -> list[Event]:
        if not self._started and text:
            self._started = True
            # (1) The UTF-8 decode algorithm strips exactly one leading BOM.
            if text.startswith(_BOM):
                text = text[1:]
        if self._skip_lf and text:
            # (2) The CR ending the previous chunk and this LF are one CRLF line end.
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        dispatched: list[Event] = []
        pos, end = 0, len(text)
        while pos < end:
            cr = text.find("\r", pos)
            lf = text.find("\n", pos)
            if cr < 0 and lf < 0:
                self._line.append(text[pos:])
                break
            if cr < 0 or (0 <= lf < cr):
                brk, nxt = lf, lf + 1
            elif cr + 1 < end:
                brk, nxt = cr, cr + (2 if text[cr + 1] == "\n" else 1)
            else:
                # A CR at the very end: the line is complete now (browsers do not wait
                # for the next chunk to dispatch), but an LF opening the next chunk
                # belongs to this line end.
                brk, nxt = cr, cr + 1
                self._skip_lf = True
            self._line.append(text[pos:brk])
            line = "".join(self._line)
            self._line.clear()
            event = self._process_line(line)
            if event is not None:
                dispatched.append(event)
            pos = nxt
        self.events.extend(dispatched)
        return dispatched

    def _process_line(self, line: str) -> Event | None:
        # (3) Blank line: dispatch.
        if not line:
            return self._dispatch()
        self._fields_seen = True
        if line[0] == ":":
            value = line[1:]
            self.comments.append(value[1:] if value.startswith(" ") else value)
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        # (4) Process the field. Names are compared case-sensitively.
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
            self._data.append("\n")
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry":
            # "consists of only ASCII digits": str.isdigit() would accept other scripts'
            # digits and superscripts, so check the ASCII range explicitly.
            if value and all("0" <= c <= "9" for c in value):
                self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        # (5) The resume point moves on every dispatch, even when no event fires, and the
        # buffer is not reset.
        self._fields_seen = False
        self.last_event_id = self._id_buffer
        if not self._data:  # the data buffer is the empty string
            self._reset_event_buffers()
            return None
        data = "".join(self._data)
        if data.endswith("\n"):
            data = data[:-1]
        event = Event(type=self._type or "message", data=data, last_event_id=self.last_event_id)
        self._reset_event_buffers()
        return event

    def _reset_event_buffers(self) -> None:
        self._data.clear()
        self._type = ""


def parse(stream: bytes | bytearray | memoryview) -> list[Event]:
    """Parse a whole stream at once; an unfinished trailing event is discarded."""
    parser = SSEParser()
    events = parser.feed(stream)
    parser.feed_eof()
    return events

"""Server-Sent Events encoding (WHATWG HTML, "Server-sent events"), pure functions on bytes.

Deliberate choices:
- ``data`` is split on CRLF, LF and CR only (the three line ends the WHATWG parser knows);
  ``str.splitlines`` would also split on U+2028, form feed and friends, which the parser
  keeps inside a line.
- ``id`` and ``event`` containing CR or LF, and ``id`` containing NUL, raise ``ValueError``:
  written out they would end the field early and let the rest inject new fields. The
  parser ignores an ``id`` with NUL, so writing it would silently break resumption.
- A space always follows the colon, so a value that itself starts with a space survives
  (the parser strips exactly one).
"""

from __future__ import annotations

from dataclasses import dataclass

_LINE_BREAKS = ("\r\n", "\r")
# The data of the last event of every answer stream (SPEC §6; OpenAI's convention).
DONE = "[DONE]"


def _lines(text: str) -> list[str]:
    for brk in _LINE_BREAKS:
        if brk in text:
            text = text.replace(brk, "\n")
    return text.split("\n")


def _check_field(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"SSE {name} must not contain a line break: {value!r}")
    if name == "id" and "\0" in value:
        raise ValueError(f"SSE id must not contain NUL: {value!r}")


def encode_event(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> bytes:
    """Encode one event, terminated by a blank line.

    Raises:
        ValueError: ``id``/``event`` holds a line break, ``id`` holds NUL, ``retry`` is
            negative, or nothing at all would be written.
    """
    if (
        comment is None
        and retry is None
        and data is not None
        and ("\n" not in data and "\r" not in data)
    ):
        # The hot path (every token of every stream): one data line, no list to join.
        head = ""
        if id is not None:
            _check_field("id", id)
            head = f"id: {id}\n"
        if event is not None:
            _check_field("event", event)
            head += f"event: {event}\n"
        return f"{head}data: {data}\n\n".encode()
    parts: list[str] = []
    if comment is not None:
        parts.extend(f": {line}\n" if line else ":\n" for line in _lines(comment))
    if id is not None:
        _check_field("id", id)
        parts.append(f"id: {id}\n")
    if event is not None:
        _check_field("event", event)
        parts.append(f"event: {event}\n")
    if retry is not None:
        if retry < 0:
            raise ValueError(f"SSE retry must be a non-negative integer: {retry!r}")
        parts.append(f"retry: {int(retry)}\n")
    if data is not None:
        parts.extend(f"data: {line}\n" for line in _lines(data))
    if not parts:
        raise ValueError("an SSE event needs at least one field or a comment")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """A comment block: ignored by clients, but it keeps proxies and idle timers awake."""
    return encode_event(comment=text)


def encode_retry(milliseconds: int) -> bytes:
    """A bare ``retry:`` field: sets the client's reconnection delay."""
    return encode_event(retry=milliseconds)


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event as a value; ``encode()`` gives its wire bytes."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def encode(self) -> bytes:
        return encode_event(
            self.data, event=self.event, id=self.id, retry=self.retry, comment=self.comment
        )

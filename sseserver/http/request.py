"""A parsed request: its head, its size-checked body, and what the application adds to
it on the way (route parameters, verified claims, the request id)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

HeaderList = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Request:
    """A parsed request head plus its (size-checked) body."""

    method: str
    target: str
    path: str
    query_string: str
    headers: HeaderList
    http_version: str
    body: bytes = b""
    client: tuple[str, int] | None = None
    received_at: float = 0.0
    params: dict[str, str] = field(default_factory=dict)  # from the route's {name} parts
    route: Any = None  # set by the application's router: what the route declared
    claims: Any = None  # set by the auth middleware: the caller's verified JWT claims
    id: str = ""  # request id (X-Request-ID from the proxy, or generated)
    _query: dict[str, list[str]] | None = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (lower case), decoded as latin-1."""
        key = name.encode("ascii")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        key = name.encode("ascii")
        return [v.decode("latin-1") for k, v in self.headers if k == key]

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            self._query = parse_qs(self.query_string, keep_blank_values=True)
        return self._query

    def query_param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON. Raises ValueError when it is not."""
        return json.loads(self.body)

    def release(self) -> None:
        """Drop what only the handler needed (headers, body, parsed query): a stream
        that outlives its handler keeps just what its log line names. Browsers send a
        dozen headers, a kilobyte or two that thousands of idle streams would hold."""
        self.headers = []
        self.body = b""
        self._query = None

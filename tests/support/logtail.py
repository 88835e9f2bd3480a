"""The JSON log lines of a server process started by a test, collected by a thread, so
tests can wait (bounded, without polling) for the access line of a request or stream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import IO, Any

LOG_WAIT_S = 3.0  # from a client's exit to the server's access log line


class LogTail:
    """The server's JSON log lines, read by a thread; waits are condition-variable waits."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                with self._cond:
                    self.lines.append(line)
                    if isinstance(record, dict):
                        self.records.append(record)
                    self._cond.notify_all()
        except (ValueError, OSError):  # the pipe was closed under us at teardown
            pass

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        with self._cond:
            return next((r for r in self.records if predicate(r)), None)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], within_s: float
    ) -> dict[str, Any] | None:
        """The first record ``predicate`` accepts, waiting (bounded) for it to be logged."""

        def find() -> dict[str, Any] | None:
            return next((r for r in self.records if predicate(r)), None)

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout=within_s)
            return find()

    async def arrival(
        self, predicate: Callable[[dict[str, Any]], bool], within_s: float
    ) -> dict[str, Any] | None:
        """``wait_for`` for async tests (the wait runs in a thread, the loop goes on)."""
        return await asyncio.to_thread(self.wait_for, predicate, within_s)

    def access(self, request_id: str, within_s: float = LOG_WAIT_S) -> dict[str, Any]:
        record = self.wait_for(
            lambda r: r.get("logger") == "sseserver.access" and r.get("request_id") == request_id,
            within_s,
        )
        assert record is not None, (
            f"no access log line for request {request_id} within {within_s} s:\n{self.text()}"
        )
        return record

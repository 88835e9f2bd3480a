"""The fake upstreams of ``tests/upstreams`` as subprocesses, for end-to-end tests where
sseserver runs as a process of its own and so cannot share the fakes' records in memory.

On top of the fakes' ``GET /_fake/stats``, every request entry also carries its ``body``
(what the SDK inside sseserver actually sent: model, system, temperature, max tokens) and
``answering`` (its handler is still running, i.e. the fake is still serving it); the top
level gains ``answering`` (how many). A connection that is open but answers nothing is an
idle keep-alive connection in the client's pool; one that is open and answering is a call
in flight, and after a failure or a cancel that would be a leak.

Run: ``python -m tests.support.upstream_procs openai|gemini --port 0`` (prints
``LISTENING http://127.0.0.1:PORT``, like the fakes themselves).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from tests.support.procs import ROOT, stop_process
from tests.upstreams import FakeUpstream, RequestRecord, Responder, main
from tests.upstreams.gemini_wire import GeminiWire
from tests.upstreams.openai_wire import OpenAIWire

START_TIMEOUT_S = 10.0


class _Recording(FakeUpstream):
    """Keeps track of the requests whose handler is still running."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._answering: set[int] = set()  # id() of RequestRecords being answered

    async def handle(self, req: RequestRecord, resp: Responder) -> None:
        self._answering.add(id(req))
        try:
            await super().handle(req, resp)
        finally:
            self._answering.discard(id(req))

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        for entry, req in zip(out["requests"], self.requests, strict=True):
            entry["body"] = req.body.decode("utf-8", "replace")
            entry["answering"] = id(req) in self._answering
        out["answering"] = len(self._answering)
        return out


class RecordingOpenAIWire(_Recording, OpenAIWire):
    pass


class RecordingGeminiWire(_Recording, GeminiWire):
    pass


CLASSES: dict[str, type[FakeUpstream]] = {
    "openai": RecordingOpenAIWire,
    "gemini": RecordingGeminiWire,
}


@dataclass
class UpstreamProcess:
    """One fake upstream subprocess."""

    api: str
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def base_url(self) -> str:
        """What sseserver's --openai-base-url / --gemini-base-url takes."""
        return f"{self.url}/v1" if self.api == "openai" else f"{self.url}/"

    def stop(self) -> None:
        stop_process(self.proc, within_s=10)


def start_upstream(api: str) -> UpstreamProcess:
    """Start ``python -m tests.support.upstream_procs API --port 0`` and wait (bounded)
    for its ``LISTENING`` line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.upstream_procs", api, "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
        if not ready:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"fake {api} upstream did not start within {START_TIMEOUT_S}s")
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            proc.wait()
            raise RuntimeError(f"fake {api} upstream exited with {proc.returncode}")
        line += byte
    assert line.startswith(b"LISTENING "), line
    return UpstreamProcess(api, proc, line.split()[1].decode())


if __name__ == "__main__":
    raise SystemExit(main(CLASSES[sys.argv[1]], sys.argv[2:]))

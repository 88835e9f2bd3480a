"""The fake upstreams of ``tests/upstreams`` as subprocesses, for end-to-end tests where
sseserver runs as a process of its own and so cannot share the fakes' records in memory.

On top of the fakes' ``GET /_fake/stats``, every request entry also carries its ``body``
(what the SDK inside sseserver actually sent: model, system, temperature, max tokens) and
``answering`` (its handler is still running, i.e. the fake is still serving it); the top
level gains ``answering`` (how many). A connection that is open but answers nothing is an
idle keep-alive connection in the client's pool; one that is open and answering is a call
in flight, and after a failure or a cancel that would be a leak.

Run: ``python -m tests.support.upstream_procs openai|gemini --port 0`` (prints
``LISTENING http://127.0.0.1:PORT``, like the fakes themselves); ``start_upstream(api,
tls=files)`` adds ``--tls-cert/--tls-key`` and the fake serves HTTPS
(``https://127.0.0.1:PORT``) with a certificate of the test CA (``tests.support.tls``).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from tests.support.procs import ROOT, stop_process, wait_listening
from tests.support.tls import TLSFiles
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
    url: str  # http://127.0.0.1:PORT, or https:// when served with ``tls``
    tls: TLSFiles | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def base_url(self) -> str:
        """What sseserver's --openai-base-url / --gemini-base-url takes."""
        return f"{self.url}/v1" if self.api == "openai" else f"{self.url}/"

    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client reading the fake's ``/_fake/`` records passes as ``verify``:
        the test CA over TLS."""
        return True if self.tls is None else self.tls.client_context()

    def stop(self) -> None:
        stop_process(self.proc, within_s=10)


def start_upstream(api: str, tls: TLSFiles | None = None) -> UpstreamProcess:
    """Start ``python -m tests.support.upstream_procs API --port 0`` (over TLS with
    ``tls``'s server certificate) and wait (bounded) for its ``LISTENING`` line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tls_args = [] if tls is None else ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.upstream_procs", api, "--port", "0", *tls_args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    url = wait_listening(proc, f"fake {api} upstream", START_TIMEOUT_S)
    return UpstreamProcess(api, proc, url, tls)


if __name__ == "__main__":
    raise SystemExit(main(CLASSES[sys.argv[1]], sys.argv[2:]))

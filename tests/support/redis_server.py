"""A real redis-server for integration tests: started in the foreground on a free loopback
port, in a temporary folder, and stopped (or killed, to play a crash) by its PID.

Without persistence (``--save '' --appendonly no``) by default; with ``appendonly=True``
every write is fsynced before Redis answers (``appendfsync always``), so a restart after
SIGKILL holds exactly what Redis acknowledged — which is what a test of "nothing
acknowledged is lost" needs to rely on.

Usage::

    with redis_running(tmp_path) as rs:
        rs.url            # redis://127.0.0.1:PORT
        rs.kill(); rs.start()   # crash and come back on the same port with the same data
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import ROOT, free_port, stop_process, wait_for_port
from tests.support.requirements import require_binary

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on ``port`` answers PING with PONG (RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One redis-server; needs no pytest (the bench runs one too)."""

    binary: str
    folder: Path
    port: int
    appendonly: bool = False
    # argv before the binary, e.g. ["nice", "-n", "0", "taskset", "-c", "1"]: commands that
    # exec the next, so that the PID is still redis-server's.
    prefix: list[str] = field(default_factory=list)
    preexec_fn: Callable[[], object] | None = None  # passed to Popen
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.appendonly
            else ["--save", "", "--appendonly", "no"]
        )
        return [
            *self.prefix,
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--databases",
            "1",
            *persistence,
        ]

    def start(self) -> None:
        """Start (again, on the same port and folder) and wait until it answers PING."""
        assert not self.running, "already running"
        self.starts += 1
        log = self.folder / f"redis-{self.starts}.log"
        self._logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                self.args(),
                cwd=self.folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec_fn,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}"
                )
            if ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server not answering on {self.port}: {self.log()[-2000:]}")

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to save or close connections gracefully."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (Redis saves and exits), SIGKILL if it does not."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self._logs if p.exists())


@contextmanager
def redis_running(
    folder: Path, *, appendonly: bool = False, port: int | None = None
) -> Iterator[RedisServer]:
    """A redis-server in ``folder`` (skips outside CI, fails in CI, when not installed)."""
    binary = require_binary("redis-server")
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, folder, port or free_port(), appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- sseserver subprocesses with their log in a file ---------------------------------------
# (procs' ``server_process`` pipes the output and never reads it: a server that logs
# a line per request for several seconds would fill the pipe and block.)


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def sseserver_running(
    folder: Path,
    *args: str,
    port: int | None = None,
    name: str = "sseserver",
    environ: Mapping[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """``python -m sseserver --port PORT *args`` with output to ``folder/name-PORT.log``;
    stopped by PID (SIGTERM, then SIGKILL after 15 s). Its environment is ``environ``
    (default: this process's), less any ``SSESERVER_`` variable."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{name}-{port}.log"
    base = os.environ if environ is None else environ
    env = {k: v for k, v in base.items() if not k.startswith("SSESERVER_")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sseserver", "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc=proc)
        yield ServerProcess(proc, port, log_path)
    finally:
        stop_process(proc)

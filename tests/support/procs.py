"""Server processes for tests (and the bench): free loopback ports, waiting for a listener
(or for the ``LISTENING URL`` line of one that picks its own port), stopping a process by
its PID, ``python -m sseserver`` in a subprocess, and the open-files limit raised for many
connections.

No pytest here: the bench imports this module outside any test. (What skips or fails
when a component is missing is in ``tests.support.requirements``.)
"""

from __future__ import annotations

import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# RLIMIT_NOFILE's hard limit when it is RLIM_INFINITY: what ``raise_nofile`` asks for.
NOFILE_INFINITY = 1_048_576


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def wait_listening(proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> str:
    """The URL of the first line ``LISTENING URL`` that ``proc`` prints on its stdout (a
    pipe), read byte by byte with a bounded wait so that nothing past it is consumed.
    A process that exits or stays silent is killed and reported."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
        if not ready:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{what} did not start within {timeout}s")
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            proc.wait()
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        line += byte
    assert line.startswith(b"LISTENING "), line
    return line.split()[1].decode()


def stop_process(proc: subprocess.Popen[bytes], within_s: float = 15.0) -> None:
    """SIGTERM (a clean exit is part of what is tested), SIGKILL if it does not come
    within ``within_s``; then close its output pipe."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(within_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextmanager
def server_process(
    *args: str, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m sseserver`` in a subprocess on a free port; stopped by PID."""
    port = port or free_port()
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sseserver", "--port", str(port), *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc=proc)
        yield proc, port
    finally:
        stop_process(proc)


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard one (RLIM_INFINITY taken
    as ``NOFILE_INFINITY``); the soft limit it now has (never lowered)."""

    def finite(limit: int) -> int:
        return NOFILE_INFINITY if limit == resource.RLIM_INFINITY else limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if finite(soft) >= finite(hard):
        return finite(soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (finite(hard), hard))
    return finite(hard)

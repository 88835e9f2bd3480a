"""Server processes for tests (and the bench): free loopback ports, waiting for a listener,
stopping a process by its PID, ``python -m sseserver`` in a subprocess, and the open-files
limit raised for many connections.

No pytest here: the bench imports this module outside any test. (What skips or fails
when a component is missing is in ``tests.support.requirements``.)
"""

from __future__ import annotations

import os
import resource
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

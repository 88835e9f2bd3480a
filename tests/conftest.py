"""Shared fixtures: in-process servers on free ports, server subprocesses, and the rule
that under CI a missing component fails instead of skipping."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import settings

from tests.support.servers import running_server as running_server

# Property-based tests: `make test` draws the same examples on every run (a fixed seed,
# no example database), so CI never passes or fails by luck; `make fuzz` selects the
# "fuzz" profile and a fresh seed per round, and prints any failing example to keep.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARTIFACTS = ROOT / "tests" / "artifacts"


def require(what: str, available: bool, reason: str = "") -> None:
    """Skip (outside CI) or fail (in CI) when a real component is missing."""
    if available:
        return
    message = f"{what} is not available{': ' + reason if reason else ''}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing component is a failure)")
    pytest.skip(message)


def require_binary(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    require(name, path is not None, f"install Debian's {name}")
    assert path is not None
    return path


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


async def read_until(reader: asyncio.StreamReader, marker: bytes, limit_s: float = 10.0) -> bytes:
    """Read until ``marker`` has been seen (or EOF); returns all bytes read."""
    buf = bytearray()
    async with asyncio.timeout(limit_s):
        while marker not in buf:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
    return bytes(buf)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test is a failure, and so is a run that ran no test."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        print(f"\nCI=true: {skipped} test(s) skipped; a skip is a failure here.")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key for RS256 tokens (made once per run: it is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key for ES256 tokens."""
    return ec.generate_private_key(ec.SECP256R1())

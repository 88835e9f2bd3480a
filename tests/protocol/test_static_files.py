"""Static files never escape their folder (SPEC §9): traversal in every encoding."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.support.hardening import (
    HARDENED,
    HOST,
    PYPROJECT,
    SECRET_MARKERS,
    _read_head,
    thread_server,
)
from tests.support.servers import running_server

pytestmark = pytest.mark.timeout(240)

# --------------------------------------------------------------------------------------
# Static files never escape their folder
# --------------------------------------------------------------------------------------

TRAVERSALS = [
    "/static/../pyproject.toml",
    "/static/../../pyproject.toml",
    "/static/%2e%2e/pyproject.toml",
    "/static/%2E%2E/pyproject.toml",
    "/static/%2e%2e%2fpyproject.toml",
    "/static/..%2fpyproject.toml",
    "/static/..%2f..%2fetc%2fpasswd",
    "/static/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/%252e%252e%252fpyproject.toml",
    "/static/..%5c..%5cpyproject.toml",
    "/static/..\\..\\pyproject.toml",
    "/static/%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/%2F%2Fetc%2Fpasswd",
    "/static/..",
    "/static/.",
    "/static/%2e%2e",
    "/static/",
    "/static/app.js/../../pyproject.toml",
    "/static/app.js%00.html",
    "/static/%00",
    "/static/..%00/pyproject.toml",
    "/static/%c0%ae%c0%ae/pyproject.toml",
    "/static/%c0%af..%c0%afpyproject.toml",
    "/static/.%2e/pyproject.toml",
    "/static/file:%2f%2f%2fetc%2fpasswd",
    "/static/C:%5cWindows%5cwin.ini",
    "/../pyproject.toml",
    "/%2e%2e/pyproject.toml",
    "/static%2f..%2fpyproject.toml",
    "/sseserver/static/app.js",
    "/static/__init__.py",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_static_path_traversal(target: str) -> None:
    with thread_server(**HARDENED) as (server, errors):
        raw = f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        with socket.create_connection((HOST, server.port), timeout=5) as sock:
            sock.sendall(raw)
            head, data, _closed = _read_head(sock, 3)
            # Read the rest of the body too (it is small) to look for file contents.
            sock.settimeout(0.5)
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except (TimeoutError, ConnectionError):
                pass
        assert head is not None, data
        assert head.status_code in (400, 404), (target, head.status_code, data[:200])
        assert not any(m in data for m in SECRET_MARKERS)
        assert PYPROJECT[:200] not in data
        assert errors.messages() == []


async def test_static_folder_is_a_fixed_table(tmp_path: Path) -> None:
    """Only regular files directly in the folder, read at start-up: no symlinks out, no
    subfolders, no files created later."""
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"root:x:0:0 secret")
    folder = tmp_path / "public"
    folder.mkdir()
    (folder / "ok.txt").write_text("hello")
    (folder / "link.txt").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.txt").write_text("inner")
    async with running_server(static_dir=str(folder)) as server:
        (folder / "late.txt").write_text("created after start-up")
        for target, status in [
            ("/static/ok.txt", 200),
            ("/static/link.txt", 404),
            ("/static/sub", 404),
            ("/static/sub/inner.txt", 404),
            ("/static/sub%2finner.txt", 404),
            ("/static/late.txt", 404),
            ("/static/..%2fsecret.txt", 404),
            ("/static/%2e%2e%2fsecret.txt", 404),
        ]:
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()
            assert data.startswith(b"HTTP/1.1 %d " % status), (target, data[:200])
            assert b"root:x:0:0" not in data
            if status == 200:
                assert data.endswith(b"hello")
                assert b"x-content-type-options: nosniff" in data.lower()

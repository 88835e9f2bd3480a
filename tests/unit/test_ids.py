"""Pooled random ids: the format of the ``secrets`` functions, no repeats, and a forked
child that draws its own bytes."""

from __future__ import annotations

import os
import re

from sseserver.wire import ids


def test_formats_match_secrets() -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", ids.token_urlsafe(12))
    assert re.fullmatch(r"[0-9a-f]{16}", ids.token_hex(8))


def test_no_repeats_across_pool_refills() -> None:
    drawn = {ids.token_hex(8) for _ in range(5000)}  # ~10 refills of the 4 KiB pool
    assert len(drawn) == 5000


def test_forked_child_does_not_reuse_the_parents_bytes() -> None:
    ids.token_hex(8)  # the pool holds bytes the child would inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, ids.token_hex(8).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != ids.token_hex(8)

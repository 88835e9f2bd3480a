"""Real components a test needs (a binary, a library, /proc): missing, the test skips
outside CI and fails under ``CI=true`` (``tests/conftest.py`` also fails a CI run that
skipped anything).

pytest is imported only when a requirement is missing, so that the helpers built on
these (``tests.support.redis_server``, ``tests.support.nginx``) import without it.
"""

from __future__ import annotations

import os
import shutil

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(what: str, available: bool, reason: str = "") -> None:
    """Skip (outside CI) or fail (in CI) when a real component is missing."""
    if available:
        return
    import pytest  # only a test gets here: skip or fail it

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

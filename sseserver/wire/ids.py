"""Random ids (generation ids, request ids) without a system call each: the bytes come
from ``os.urandom`` 4 KiB at a time. Every process draws its own: a forked worker drops
what it inherited, so no two workers hand out the same id."""

from __future__ import annotations

import base64
import os
import re

_CHUNK = 4096


class _Pool:
    __slots__ = ("data", "pos")

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            self.data = os.urandom(max(_CHUNK, n))
            self.pos = 0
        start = self.pos
        self.pos = start + n
        return self.data[start : self.pos]

    def drop(self) -> None:
        self.data = b""
        self.pos = 0


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.drop)


def token_urlsafe(nbytes: int) -> str:
    """Like ``secrets.token_urlsafe``: ``nbytes`` random bytes, base64url, unpadded."""
    return base64.urlsafe_b64encode(_pool.take(nbytes)).rstrip(b"=").decode("ascii")


def token_hex(nbytes: int) -> str:
    """Like ``secrets.token_hex``."""
    return _pool.take(nbytes).hex()


# What a request id taken from a client or proxy may look like (it goes into headers and
# logs); anything else is replaced by one of ours.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(given: str | None) -> str:
    """``given`` (nginx's ``$request_id``, say) when it is sane, else a new id."""
    return given if given and REQUEST_ID.fullmatch(given) else token_hex(8)

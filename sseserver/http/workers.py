"""``--workers N``: N forked processes, each binding the port with ``SO_REUSEPORT`` so the
kernel spreads connections; a worker that dies is started again. SIGTERM/SIGINT to the
supervisor is passed on to every worker, which shuts down gracefully (§10)."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger("sseserver")

RESTART_BACKOFF_S = 0.5  # a worker that keeps crashing is not restarted in a tight loop


def supervise(workers: int, serve: Callable[[int], int], *, grace_s: float) -> int:
    """Fork ``workers`` children running ``serve(index)``; returns the exit code."""
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = serve(index)
            finally:
                os._exit(code)
        children[pid] = index

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(workers):
        spawn(i)
    log.info("supervising %d workers", workers)
    deadline: float | None = None
    while children:
        if stopping and deadline is None:
            deadline = time.monotonic() + grace_s + 5
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if deadline is not None and time.monotonic() > deadline:
                for child in list(children):
                    os.kill(child, signal.SIGKILL)
            time.sleep(0.05)
            continue
        index = children.pop(pid)
        if not stopping:
            log.error(
                "worker %d (pid %d) exited (%s); restarting",
                index,
                pid,
                os.waitstatus_to_exitcode(status),
            )
            time.sleep(RESTART_BACKOFF_S)
            spawn(index)
    return 0

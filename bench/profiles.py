"""py-spy around a load: a profile of the server per scenario, summarised by kind of
code (ours, the event loop, h11, system calls, ...) and by Python package."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.harness import LOADGEN_CORE, PY, RESULTS
from bench.servers import Server


def start(srv: Server) -> tuple[subprocess.Popen[bytes], Path] | None:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists() or srv.spec.name != "sseserver":
        return None
    raw = srv.tmp / "profile.raw"
    proc = subprocess.Popen(
        [
            *("taskset", "-c", LOADGEN_CORE, spy, "record", "-p", str(srv.pid)),
            *("-r", "200", "--native", "-f", "raw", "-o", str(raw)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, raw


def stop(spy: tuple[subprocess.Popen[bytes], Path], name: str, say: Callable[[str], None]) -> None:
    proc, raw = spy
    libraries = name.startswith("proxy")  # where the provider's time goes
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if raw.exists():
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"profile_{name}.txt").write_text(
            summarize_profile(raw.read_text(), libraries=libraries)
        )
        say(f"profile written to bench/results/profile_{name}.txt")


def summarize_profile(raw: str, top: int = 25, libraries: bool = False) -> str:
    """Self and inclusive sample shares from py-spy's raw (collapsed stacks) output.

    Samples of idle thread-pool workers (waiting for work; ``--native`` sampling does not
    tell them idle) are left out. ``libraries``: also time by Python package (openai,
    httpx, httpcore, h11, sseserver, ...)."""
    stacks: list[tuple[list[str], int]] = []
    idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if _idle_worker(frames):
            idle += int(count)
        else:
            stacks.append((frames, int(count)))
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for frames, n in stacks:
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return "no samples\n"
    cats: dict[str, int] = {}
    for f, n in own.items():
        cat = _category(f)
        cats[cat] = cats.get(cat, 0) + n
    out = [f"samples: {total}"]
    if idle:
        out.append(f"left out: {idle} samples of idle thread-pool workers (waiting for work)")
    out += ["", "self time by kind:"]
    for c, n in sorted(cats.items(), key=lambda kv: -kv[1]):
        out.append(f"  {100 * n / total:5.1f}%  {c}")
    out += ["", "self time (top frames):"]
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:5.1f}%  {f}")
    out += ["", "inclusive time, sseserver frames:"]
    ours = [(f, n) for f, n in incl.items() if "sseserver/" in f]
    for f, n in sorted(ours, key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:5.1f}%  {f}")
    if libraries:
        mine: dict[str, int] = {}
        libs: dict[str, int] = {}
        for frames, n in stacks:
            packages = [p for p in map(_package, frames) if p]
            if packages:
                mine[packages[-1]] = mine.get(packages[-1], 0) + n
            for p in set(packages):
                libs[p] = libs.get(p, 0) + n
        out += [
            "",
            "self time by Python package (native frames charged to the Python code that "
            "called them):",
        ]
        for lib, n in sorted(mine.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"  {100 * n / total:5.1f}%  {lib}")
        out += ["", "inclusive time by Python package (a stack counts once per package in it):"]
        for lib, n in sorted(libs.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"  {100 * n / total:5.1f}%  {lib}")
    return "\n".join(out) + "\n"


def _idle_worker(frames: list[str]) -> bool:
    """A thread-pool worker blocked in its queue's ``get`` (no work to do)."""
    return any(f.startswith("_worker (concurrent/futures/thread.py") for f in frames) and any(
        "SimpleQueue_get" in f for f in frames[-6:]
    )


def _package(frame: str) -> str:
    """The Python package of a frame: ``f (openai/_streaming.py:398)`` -> ``openai``,
    ``f (typing.py:2444)`` -> ``typing``; '' for native frames and the entry point."""
    where = frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else ""
    path = where.rpartition(":")[0]
    if not path.endswith((".py", ".pyx")) or path.startswith(("<", "bench/")):
        return ""
    head = path.split("/", 1)[0]
    return head.rpartition(".")[0] if "/" not in path else head


SYSCALLS = ("write", "read", "send", "recv", "epoll", "accept", "close", "getsock", "setsock")


def _category(frame: str) -> str:
    if "gc_collect" in frame:
        return "cyclic garbage collector"
    if "(libc" in frame:
        name = frame.split(" ", 1)[0]
        return "system calls (libc)" if name.startswith(SYSCALLS) or name == "syscall" else "libc"
    if "sseserver/" in frame:
        return "sseserver code"
    if "h11/" in frame:
        return "h11"
    if "json/" in frame or "_json" in frame:
        return "json"
    if "asyncio/" in frame or "uvloop" in frame or "Runner.run" in frame:
        return "event loop (asyncio/uvloop)"
    if ".py:" in frame or "<frozen" in frame or "<string>" in frame:
        return "other Python code (stdlib, prometheus_client, ...)"
    return "interpreter and other native code"

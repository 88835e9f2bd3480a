"""Micro-benchmarks of the hot functions, in process, in seconds: a change to the hot
path is measured before the load suite runs.

    python -m bench.micro            # every case, a table on stdout
    python -m bench.micro --only fanout --repeat 9

- ``encode``: one token event's SSE encoding (``encode_event``) and chunk framing;
- ``publish``: one generation token through the hub (encode, frame, keep, no reader);
- ``fanout``: one published event written to N in-memory transports (the same bytes
  object to each), per delivery;
- ``resume``: a replay of 100 events after a Last-Event-ID.

Each figure is the best of ``--repeat`` runs (the least disturbed by other programs on
a shared machine), in nanoseconds per operation. Results also go to
``bench/results/micro.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sseserver.hub.base import Subscription
from sseserver.hub.memory import MemoryHub
from sseserver.wire.chunked import Frame, frame
from sseserver.wire.sse import encode_event

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = '{"text":"lorem "}'


class NullTransport:
    """A transport that takes bytes and drops them: what fan-out costs before the kernel."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        self.written += 1


class Reader:
    """The few parts of an ``EventStream`` that fan-out touches (``write_frame``)."""

    __slots__ = ("bytes_sent", "transport")

    def __init__(self) -> None:
        self.transport = NullTransport()
        self.bytes_sent = 0

    def write_frame(self, f: Frame) -> bool:
        self.transport.write(f.chunked)
        self.bytes_sent += f.size
        return True

    def on_close(self, callback: Callable[[Any], None]) -> None:
        pass


def best_ns(run: Callable[[], int], repeat: int) -> float:
    """The best of ``repeat`` runs of ``run`` (which returns its operation count)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        ops = run()
        best = min(best, (time.perf_counter_ns() - start) / ops)
    return best


def case_encode(n: int = 50_000) -> int:
    for i in range(n):
        frame(encode_event(TOKEN, id=f"abcdefghijklmnop:{i}"))
    return n


def case_publish(n: int = 50_000) -> int:
    hub = MemoryHub(history_bytes=1 << 40)
    topics = ("streams/abcdefghijklmnop",)
    for i in range(n):
        hub.dispatch(hub.make_update(topics, TOKEN, id=f"abcdefghijklmnop:{i}"))
    return n


def case_fanout(readers: int = 1000, events: int = 200) -> int:
    hub = MemoryHub(history=10)
    for _ in range(readers):
        hub.attach(Subscription(Reader(), ("news",)))  # type: ignore[arg-type]
    for i in range(events):
        hub.dispatch(hub.make_update(("news",), TOKEN, id=f"n{i}"))
    return readers * events


def case_resume(n: int = 2_000) -> int:
    hub = MemoryHub()
    topics = ("streams/g",)
    for i in range(200):
        hub.dispatch(hub.make_update(topics, TOKEN, id=f"g:{i}"))
    sub = Subscription(Reader(), topics)  # type: ignore[arg-type]
    for _ in range(n):
        hub.replay(sub, "g:99")
    return n


CASES: dict[str, tuple[Callable[[], int], str]] = {
    "encode": (case_encode, "ns per token event encoded and framed"),
    "publish": (case_publish, "ns per generation token through the hub"),
    "fanout": (case_fanout, "ns per delivery, 1,000 readers"),
    "resume": (case_resume, "ns per replay of 100 events"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated cases")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    chosen = [c for c in args.only.split(",") if c] or list(CASES)
    results = {}
    for name in chosen:
        run, unit = CASES[name]
        ns = best_ns(run, args.repeat)
        results[name] = {"ns": round(ns, 1), "unit": unit}
        print(f"{name:8} {ns:10.1f}  {unit}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "micro.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

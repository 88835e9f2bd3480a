"""Soak: a steady stream of generations for a long time, and the server's RSS over it.

    python -m bench.soak --minutes 3                  # part of `make bench`
    python -m bench.soak --minutes 30                 # `make soak`: the issue's figure
    python -m bench.soak --minutes 30 --source ../old --label before   # another checkout

The server (one process, default flags unless ``--server-arg``) is pinned to core 0 and
this driver to core 1. First a short closed-loop probe finds how many generations per
second the process completes (``--probe-s``); the soak then starts generations open-loop
at half that rate (``--rate`` to fix it), each a fresh connection to ``/v1/stream`` read
to ``[DONE]``. Every few seconds it samples the server's RSS (and the
``sseserver_history_bytes`` gauge when the server has one).

Verdict, as the target states it: RSS at the end within 10 % of RSS after the first
minute, and never above the baseline plus the history budget. The baseline is the peak
RSS of the same load on a server that keeps no history (run it first, labelled
``no-history``: ``--server-arg=--history-bytes=1 --server-arg=--resume-window-s=0``);
without that run, the RSS at rest. The run stops early
when RSS passes ``--rss-cap-mib`` (a server without a budget would otherwise take the
machine). Results: ``bench/results/soak_<label>.json`` and, for every label present,
``bench/results/soak_rss.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, ROOT, free_port, http_get
from bench.load.addressing import get_request, stream_target
from bench.load.meters import proc_cpu_s, proc_rss_kb
from tests.support.procs import raise_nofile

SERVER_CORE = "0"
DRIVER_CORE = "1"
DONE_MARK = b"data: [DONE]"
DEFAULT_BUDGET_MIB = 256  # --history-bytes' default (SPEC §10)


class Generation(asyncio.Protocol):
    """One request; done when ``[DONE]`` arrives (then closes), failed otherwise."""

    def __init__(self, request: bytes, done: asyncio.Future[bool]) -> None:
        self.request = request
        self.done = done
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if DONE_MARK in self.tail + data:
            if not self.done.done():
                self.done.set_result(True)
            assert self.transport is not None
            self.transport.close()
            return
        self.tail = data[-len(DONE_MARK) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


class Driver:
    def __init__(self, port: int, target: str, max_in_flight: int) -> None:
        self.port = port
        self.request = get_request("127.0.0.1", port, target)
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.completed = 0
        self.failed = 0
        self.shed = 0  # not started: too many in flight (the server fell behind)

    async def one(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self.in_flight += 1
        try:
            await loop.create_connection(
                lambda: Generation(self.request, done), "127.0.0.1", self.port
            )
            ok = await asyncio.wait_for(done, 60)
        except (OSError, TimeoutError):
            ok = False
        finally:
            self.in_flight -= 1
        if ok:
            self.completed += 1
        else:
            self.failed += 1

    async def closed_loop(self, concurrency: int, seconds: float) -> float:
        """Generations per second with ``concurrency`` always in flight."""
        start_count = self.completed
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                await self.one()

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (self.completed - start_count) / (time.monotonic() - t0)

    def start_due(self, tasks: set[asyncio.Task[None]]) -> None:
        if self.in_flight >= self.max_in_flight:
            self.shed += 1
            return
        task = asyncio.get_running_loop().create_task(self.one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def history_bytes(port: int) -> int | None:
    try:
        status, body = http_get(port, "/metrics", timeout=2.0)
    except OSError:
        return None
    if status != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("sseserver_history_bytes"):
            return int(float(line.split()[-1]))
    return None


async def soak(args: argparse.Namespace, pid: int, port: int, say: Any) -> dict[str, Any]:
    target = stream_target(args.tokens, 0, 0, args.size)
    driver = Driver(port, target, args.max_in_flight)
    rest_kb = proc_rss_kb(pid)
    rate = args.rate
    if not rate:
        capacity = await driver.closed_loop(args.probe_concurrency, args.probe_s)
        rate = capacity / 2
        say(f"probe: {capacity:.0f} generations/s completed; soaking at {rate:.0f}/s")
    after_probe_kb = proc_rss_kb(pid)
    tasks: set[asyncio.Task[None]] = set()
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    cpu0 = proc_cpu_s(pid)
    completed0 = driver.completed
    end = t0 + args.minutes * 60
    next_sample = t0
    started = 0
    stopped_early = ""
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - t0) * rate) - started
        for _ in range(due):
            driver.start_due(tasks)
        started += max(due, 0)
        if now >= next_sample:
            rss_kb = proc_rss_kb(pid)
            sample = {
                "t_s": round(now - t0, 1),
                "rss_mib": round(rss_kb / 1024, 1),
                "completed": driver.completed - completed0,
                "failed": driver.failed,
                "shed": driver.shed,
                "in_flight": driver.in_flight,
                "history_mib": None,
            }
            held = await asyncio.get_running_loop().run_in_executor(None, history_bytes, port)
            if held is not None:
                sample["history_mib"] = round(held / 2**20, 1)
            samples.append(sample)
            say(
                f"t={sample['t_s']:7.1f}s rss={sample['rss_mib']:8.1f} MiB "
                f"done={sample['completed']} failed={driver.failed} shed={driver.shed} "
                f"history={sample['history_mib']}"
            )
            next_sample += args.sample_s
            if rss_kb / 1024 > args.rss_cap_mib:
                stopped_early = f"RSS passed {args.rss_cap_mib} MiB"
                say(f"stopping: {stopped_early}")
                break
        await asyncio.sleep(0.01)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    elapsed = time.monotonic() - t0
    cpu = proc_cpu_s(pid) - cpu0
    await asyncio.sleep(2)  # let the server settle, then one more sample
    samples.append(
        {
            "t_s": round(time.monotonic() - t0, 1),
            "rss_mib": round(proc_rss_kb(pid) / 1024, 1),
            "completed": driver.completed - completed0,
            "failed": driver.failed,
            "shed": driver.shed,
            "in_flight": driver.in_flight,
            "history_mib": None,
            "after_load": True,
        }
    )
    at_1min = next((s for s in samples if s["t_s"] >= 60), samples[0])
    during = [s for s in samples if not s.get("after_load")]
    last = during[-1]
    peak = max(s["rss_mib"] for s in samples)
    budget = args.budget_mib
    baseline = load_baseline(args.baseline_label)
    return {
        "label": args.label,
        "minutes": args.minutes,
        "rate_per_s": round(rate, 1),
        "tokens": args.tokens,
        "size": args.size,
        "server_args": args.server_arg,
        "rss_rest_mib": round(rest_kb / 1024, 1),
        "rss_after_probe_mib": round(after_probe_kb / 1024, 1),
        "rss_1min_mib": at_1min["rss_mib"],
        "rss_end_mib": last["rss_mib"],
        "rss_after_load_mib": samples[-1]["rss_mib"],
        "rss_peak_mib": peak,
        "end_over_1min": round(last["rss_mib"] / at_1min["rss_mib"], 3),
        "flat": last["rss_mib"] <= at_1min["rss_mib"] * 1.10,
        "under_rest_plus_budget": peak <= rest_kb / 1024 + budget,
        "load_baseline_mib": baseline,
        "under_budget": peak <= (baseline if baseline is not None else rest_kb / 1024) + budget,
        "generations": driver.completed - completed0,
        "failed": driver.failed,
        "shed": driver.shed,
        "generations_per_s": round((driver.completed - completed0) / elapsed, 1),
        "server_cpu_share": round(cpu / elapsed, 3),
        "stopped_early": stopped_early,
        "samples": samples,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def load_baseline(label: str) -> float | None:
    """The peak RSS of the same load on a server that keeps no history (a run labelled
    ``label``, made with ``--history-bytes 1 --resume-window-s 0``): what the process
    needs to serve the traffic at all, on top of which the budget is spent."""
    path = RESULTS / f"soak_{label}.json"
    if not label or not path.exists():
        return None
    return float(json.loads(path.read_text())["rss_peak_mib"])


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    source = Path(args.source).resolve() if args.source else ROOT
    env = dict(os.environ, PYTHONPATH=str(source), PYTHONUNBUFFERED="1")
    argv = ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "bench.serve_sseserver"]
    argv += ["--port", str(port), "--log-level", "warning", *args.server_arg]
    proc = subprocess.Popen(argv, cwd=source, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited at start")
        try:
            if http_get(port, "/healthz", timeout=1.0)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server not ready in 20 s")


def write_chart() -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for path in sorted(RESULTS.glob("soak_*.json")):
        r = json.loads(path.read_text())
        xs = [s["t_s"] / 60 for s in r["samples"]]
        ys = [s["rss_mib"] for s in r["samples"]]
        ax.plot(xs, ys, label=f"{r['label']} ({r['rate_per_s']:.0f} gen/s)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS, MiB")
    ax.set_title("Soak: generations of 100 tokens, read to [DONE]")
    ax.legend()
    ax.grid(alpha=0.3)
    out = RESULTS / "soak_rss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_table() -> Path:
    """bench/results/SOAK.md: one row per label (the newest run of each)."""
    rows = [
        "| run | when | minutes | gen/s | RSS rest | 1 min | end | peak | after load "
        "| end / 1 min | flat (≤ 1.10) | load baseline | peak ≤ baseline + budget | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("soak_*.json")):
        r = json.loads(path.read_text())
        minutes = r["samples"][-1]["t_s"] / 60
        rows.append(
            f"| {r['label']} | {r['when']} | {minutes:.1f} | {r['generations_per_s']} "
            f"| {r['rss_rest_mib']} | {r['rss_1min_mib']} | {r['rss_end_mib']} "
            f"| {r['rss_peak_mib']} | {r['rss_after_load_mib']} | {r['end_over_1min']} "
            f"| {'yes' if r['flat'] else 'NO'} | {r.get('load_baseline_mib') or '—'} "
            f"| {'yes' if r['under_budget'] else 'NO'} "
            f"| {r['stopped_early'] or ''} |"
        )
    out = RESULTS / "SOAK.md"
    text = (
        "# Soak: server RSS (MiB) over a long run of generations\n\n"
        "Generations of 100 tokens read to `[DONE]`, started open-loop at half the "
        "process's capacity; server on core 0, driver on core 1 (`python -m bench.soak`). "
        "Budget: `--history-bytes` (default 256 MiB). Chart: `soak_rss.png`.\n\n"
    )
    out.write_text(text + "\n".join(rows) + "\n")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=0.0, help="generations per second (0: probe)")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--size", type=int, default=0, help="characters per token (0: default)")
    p.add_argument("--probe-s", type=float, default=10.0)
    p.add_argument("--probe-concurrency", type=int, default=50)
    p.add_argument("--max-in-flight", type=int, default=2000)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--rss-cap-mib", type=float, default=4096.0)
    p.add_argument("--budget-mib", type=float, default=DEFAULT_BUDGET_MIB)
    p.add_argument("--source", default="", help="a checkout to run the server from")
    p.add_argument("--label", default="current")
    p.add_argument("--server-arg", action="append", default=[], help="passed to the server")
    p.add_argument(
        "--baseline-label",
        default="no-history",
        help="the run (same load, no history kept) whose peak RSS is the baseline",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    os.sched_setaffinity(0, {int(DRIVER_CORE)})

    def say(msg: str) -> None:
        print(f"[soak {args.label}] {msg}", file=sys.stderr, flush=True)

    port = free_port()
    proc = start_server(args, port)
    try:
        runner: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = asyncio.run
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
        result = runner(soak(args, proc.pid, port, say))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"soak_{args.label}.json").write_text(json.dumps(result, indent=1) + "\n")
    chart = write_chart()
    write_table()
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary))
    say(
        f"RSS at rest {result['rss_rest_mib']} MiB, after 1 min {result['rss_1min_mib']}, "
        f"end {result['rss_end_mib']}, peak {result['rss_peak_mib']}, after the load "
        f"{result['rss_after_load_mib']}; flat={result['flat']} "
        f"under_budget={result['under_budget']}; chart {chart}"
    )
    return 0 if result["flat"] and result["under_budget"] and not result["stopped_early"] else 1


if __name__ == "__main__":
    sys.exit(main())

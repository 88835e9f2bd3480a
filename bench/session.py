"""One benchmark run: servers started for a load, the load generator run against them,
noisy windows measured again, a ramp to the largest count held, records written."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench import profiles
from bench.harness import LOADGEN_CORE, PY, RESULTS, ROOT, pinned, raise_nofile_in_child
from bench.servers import SERVERS, RedisServer, Server
from bench.settings import (
    DELIVERED_SHARE,
    FIRST_EVENT_BOUND_MS,
    IDLE_KINDS,
    LATENESS_BOUND_MS,
    Settings,
)

NOISE_LIMIT = 0.2  # busy share of a core taken by other programs that makes a run suspect
RETRIES = 2  # extra runs of a measurement that was noisy


def noise(cpu: dict[str, Any] | None) -> float:
    """How much other programs took of our cores in a window (0: none). Core 0's share
    beyond the server includes softirq work for its own traffic, hence the allowance."""
    if not cpu:
        return 0.0
    return max(float(cpu.get("core1_other", 0.0)), float(cpu.get("core0_other", 0.0)) - 0.15)


def _main_cpu(r: dict[str, Any]) -> dict[str, Any] | None:
    cpu = r.get("cpu_steady") or r.get("cpu") or r.get("cpu_open") or r.get("cpu_fresh")
    return cpu if isinstance(cpu, dict) else None


# -- running one load ----------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    settings: Settings
    run_id: str
    profile: bool = False
    idle_kinds: tuple[str, ...] = tuple(IDLE_KINDS)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def say(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def server(
        self, name: str, extra_args: list[str] | None = None, env: dict[str, str] | None = None
    ) -> Iterator[Server]:
        """The server ``name``, started and warmed up; a spec.redis server first gets a
        private redis-server (RedisServer) and ``--hub`` pointing at it. Both are stopped
        by PID on the way out."""
        spec = SERVERS[name]
        redis = RedisServer() if spec.redis else None
        try:
            args = [*(extra_args or []), *(["--hub", redis.url] if redis else [])]
            srv = Server(spec, self.say, args, env)
            srv.redis = redis
            try:
                yield srv
            finally:
                srv.stop()
        finally:
            if redis is not None:
                redis.stop()

    def loadgen(
        self,
        srv: Server,
        scenario: str,
        args: list[Any],
        timeout_s: float,
        profile_as: str = "",
        port: int = 0,
        pid: int = 0,
    ) -> dict[str, Any]:
        argv = [
            *pinned(LOADGEN_CORE),
            PY,
            "-m",
            "bench.loadgen",
            scenario,
            "--port",
            str(port or srv.port),
            "--flavor",
            srv.spec.flavor,
            "--server-pid",
            str(pid or srv.measure_pid),
            "--label",
            f"{srv.spec.name} {scenario}",
            *[str(a) for a in args],
        ]
        if srv.redis is not None:  # on the generator's core: measured, not noise
            argv += ["--upstream-pid", str(srv.redis.pid), "--upstream-name", "redis"]
        spy = profiles.start(srv) if profile_as else None
        try:
            out = subprocess.run(
                argv,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                timeout=timeout_s,
                preexec_fn=raise_nofile_in_child,
                check=False,
            )
        finally:
            if spy is not None:
                profiles.stop(spy, profile_as, self.say)
        lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"loadgen {scenario} failed (exit {out.returncode})")
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.spec.name} died during {scenario}: {srv.log_tail()}")
        if srv.redis is not None and not srv.redis.running:
            raise RuntimeError(f"redis-server died during {scenario}: {srv.redis.log_tail()}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def measure(
        self,
        what: str,
        attempt: Callable[[], dict[str, Any]],
        good: Callable[[dict[str, Any]], bool],
        profiled: bool | None = None,
    ) -> dict[str, Any]:
        """Run ``attempt``; while its result is not ``good`` and the window was noisy
        (other programs busy on our cores), run it again, up to RETRIES times. Returns the
        first good result, else the least noisy one; records how many runs it took.
        ``profiled``: whether ``attempt`` runs py-spy (default: ``--profile``)."""
        profiled = self.profile if profiled is None else profiled
        results: list[dict[str, Any]] = []
        # py-spy runs on the generator's core: it would read as noise; profile once.
        for i in range(1 if profiled else RETRIES + 1):
            r = attempt()
            r["noise"] = round(noise(_main_cpu(r)), 3)
            results.append(r)
            if good(r) or r["noise"] <= NOISE_LIMIT:
                break
            if i < RETRIES and not profiled:
                self.say(
                    f"{what}: other programs took {r['noise']:.0%} of a core during the "
                    "window; measuring again"
                )
                time.sleep(3)
        best = next((r for r in results if good(r)), None) or min(results, key=lambda r: r["noise"])
        best["attempts"] = len(results)
        return best

    # -- records ---------------------------------------------------------------------------

    def record(
        self,
        scenario: str,
        variant: str,
        server: str,
        metrics: dict[str, Any] | None,
        error: str | None = None,
        skipped: str | None = None,
        profiled: bool | None = None,
    ) -> None:
        """``profiled``: whether these numbers were measured under py-spy (default:
        ``--profile`` and sseserver); profiled records stay out of RESULTS.md."""
        if profiled is None:
            profiled = self.profile and server == "sseserver"
        rec = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "run": self.run_id,
            "mode": self.settings.mode,
            "scenario": scenario,
            "variant": variant,
            "server": server,
            "ok": error is None and skipped is None,
            "error": error,
            "skipped": skipped,
            "profiled": profiled,
            "metrics": metrics or {},
        }
        self.records.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "results.jsonl", "a") as f:
            f.write(line + "\n")

    def ramp(
        self, steps: list[int], bisect: int, grain: int, step: Callable[[int], bool]
    ) -> tuple[int, int]:
        """Step the count up until ``step(n)`` fails, then bisect between the last count
        held and the first that failed ``bisect`` times (counts rounded down to ``grain``).
        Returns (largest count held or 0, first failing count or 0)."""
        held = failed_at = 0
        for n in steps:
            if step(n):
                held = n
            else:
                failed_at = n
                break
        for _ in range(bisect):
            if not failed_at or failed_at - held <= 2 * grain:
                break
            mid = (held + failed_at) // 2 // grain * grain
            if step(mid):
                held = mid
            else:
                failed_at = mid
        return held, failed_at

    def lateness_step(
        self,
        what: str,
        attempt: Callable[[], dict[str, Any]],
        profiled: bool | None = None,
        extra: Callable[[dict[str, Any]], str] = lambda r: "",
    ) -> dict[str, Any]:
        """One step of a token-stream ramp (loadgen ``tokens``), held only as a user sees
        it (``held``): every stream answered and every token delivered, with no slack past
        the schedule's end; first event p99 within FIRST_EVENT_BOUND_MS of the request; at
        least DELIVERED_SHARE of the events offered in the steady window delivered in it;
        steady p99 lateness (from each request's schedule) within LATENESS_BOUND_MS."""
        r = self.measure(what, attempt, held, profiled=profiled)
        r["held"] = held(r)
        self.say(
            f"{what}: {'held' if r['held'] else 'FAILED'} — steady p99 "
            f"{r['steady_lateness_ms'].get('p99')} ms "
            f"(all tokens: {r['lateness_ms'].get('p99')} ms), first event p99 "
            f"{r['first_event_ms'].get('p99')} ms, delivered {r['delivered_share']:.1%} of "
            f"{r['window_offered']} offered in the {r['window_s']} s window, "
            f"lost {r['lost']}, failures {r['failures']}, "
            f"server {r['cpu'].get('server_util', 0):.0%} cpu, "
            f"generator {r['cpu']['gen_util']:.0%} cpu" + extra(r)
        )
        return r


def held(r: dict[str, Any]) -> bool:
    """The capacity rule of a token-stream step (see Bench.lateness_step)."""
    inf = float("inf")
    return bool(
        r["failures"] == 0
        and r["lost"] == 0
        and not r["timed_out"]
        and r["window_offered"] > 0
        and r["delivered_share"] >= DELIVERED_SHARE
        and r["first_event_ms"].get("p99", inf) <= FIRST_EVENT_BOUND_MS
        and r["steady_lateness_ms"].get("p99", inf) <= LATENESS_BOUND_MS
    )

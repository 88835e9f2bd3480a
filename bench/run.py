"""Benchmarks side by side: sseserver and its peers, one scenario and one server at a time.

    python -m bench.run --quick                       # a few minutes, every server
    python -m bench.run --full                        # longer: bigger counts, finer ramps
    python -m bench.run --quick --only idle,tokens --servers sseserver
    python -m bench.run --quick --only fanout --servers sseserver --profile
    python -m bench.run --quick --only proxy --servers sseserver [--profile]
    python -m bench.run --quick --only fanout --servers sseserver,sseserver-redis

For each scenario and server: start the server pinned to core 0 (``taskset -c 0``) with
RLIMIT_NOFILE raised to its hard limit, warm it up, run ``bench.loadgen`` pinned to core 1,
stop the server by its PID. Progress goes to stderr; ONE JSON line per result goes to
stdout and is appended to bench/results/results.jsonl. At the end bench/results/RESULTS.md
(scenarios as rows, servers as columns, ratio to sseserver) and PNG charts are rewritten
from the newest result of each (scenario, variant, server) of this mode.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.loadgen import (
    DELIVERED_SHARE,
    FIRST_EVENT_BOUND_MS,
    sub_target,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
PY = sys.executable
NODE = shutil.which("node") or "/usr/bin/node"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
REDIS_SERVER = shutil.which("redis-server") or ""
SERVER_CORE = "0"
LOADGEN_CORE = "1"
LATENESS_BOUND_MS = 50.0
NICE: list[str] = []  # ["nice", "-n", "-5"] with --nice -5: favour the measured processes

ALL_SCENARIOS = ("idle", "tokens", "fanout", "ttft", "proxy", "cancel")
DEFAULT_SCENARIOS = ("idle", "tokens", "fanout", "ttft")
# sseserver-redis: sseserver with --hub redis://... against a private redis-server (fanout
# only); in the default list, skipped with the reason when redis-server is not on PATH.
ALL_SERVERS = ("sseserver", "sseserver-redis", "uvicorn", "aiohttp", "node", "nchan")
# idle holds either generations (/v1/stream with a far first token; records "idle") or
# subscriptions to one topic nobody publishes to (records "idle-sub"): --idle-kinds
IDLE_KINDS = {"generations": "idle", "subscriptions": "idle-sub"}
# The order of the report's rows: scenarios as recorded (idle-sub is part of idle).
REPORT_SCENARIOS = ("idle", "idle-sub", *ALL_SCENARIOS[1:])


# -- settings ------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    mode: str
    idle_streams: list[int]
    token_steps: list[int]
    token_count: int
    token_bisect: int
    fanout_subscribers: list[int]
    fanout_duration_s: float
    fanout_publishers: list[int]
    ttft_requests: int
    proxy_steps: list[int]  # concurrent 50 token/s streams through the OpenAI provider
    proxy_bisect: int
    # sseserver-redis runs only fanout, at these subscriber counts (--fanout-subscribers
    # overrides them too)
    redis_fanout_subscribers: list[int] = dataclasses.field(default_factory=lambda: [1000])
    settle_s: float = 2.0


QUICK = Settings(
    mode="quick",
    idle_streams=[10_000],
    token_steps=[250, 500, 1000, 2000, 4000, 8000],
    token_count=200,  # 4 s at 50 tokens/s: 3 s of steady state after a 1 s opening ramp
    token_bisect=1,  # one step between the last count held and the first that failed
    fanout_subscribers=[1000],
    fanout_duration_s=4.0,
    fanout_publishers=[1, 4],
    ttft_requests=300,
    proxy_steps=[50, 100, 200, 400, 800, 1600, 3200],
    proxy_bisect=1,
)
FULL = Settings(
    mode="full",
    idle_streams=[10_000, 50_000],
    token_steps=[250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000, 16000],
    token_count=500,  # 10 s at 50 tokens/s: 9 s of steady state after the opening ramp
    token_bisect=2,
    fanout_subscribers=[1000, 10_000],
    fanout_duration_s=10.0,
    fanout_publishers=[1, 4],
    ttft_requests=2000,
    proxy_steps=[25, 50, 100, 150, 200, 300, 400, 600, 800, 1200, 1600, 2400, 3200],
    proxy_bisect=2,
)


# -- servers -------------------------------------------------------------------------------


@dataclasses.dataclass
class ServerSpec:
    name: str
    flavor: str  # how the load generator addresses it (see loadgen.FLAVORS)
    scenarios: tuple[str, ...]
    argv: Callable[[int, Path], list[str]]
    available: Callable[[], str | None] = lambda: None  # None, or why it cannot run
    version: Callable[[], str] = lambda: ""
    redis: bool = False  # runs against a private redis-server (RedisServer), --hub URL


def _pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def _nchan_argv(port: int, tmp: Path) -> list[str]:
    conf = (PEERS / "nchan.conf").read_text().replace("127.0.0.1:8089", f"127.0.0.1:{port}")
    (tmp / "nchan.conf").write_text(conf)
    return [NGINX, "-p", f"{tmp}/", "-e", "stderr", "-c", str(tmp / "nchan.conf")]


def _command_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def _python_peer(module: str, *packages: str) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [p for p in packages if _pkg_version(p) == "?"]
        return f"missing Python packages: {', '.join(missing)}" if missing else None

    return check


def _sseserver_argv(port: int, tmp: Path) -> list[str]:
    return [
        *(PY, "-m", "bench.serve_sseserver", "--port", str(port)),
        *("--log-level", "warning", "--shutdown-grace-s", "1"),
    ]


def _redis_available() -> str | None:
    if not REDIS_SERVER:
        return "redis-server not on PATH (Debian: apt-get install redis-server)"
    if _pkg_version("redis") == "?":
        return "missing Python package: redis (sseserver's Redis hub client)"
    return None


SERVERS: dict[str, ServerSpec] = {
    "sseserver": ServerSpec(
        "sseserver",
        "sseserver",
        ALL_SCENARIOS,
        _sseserver_argv,
        version=lambda: _pkg_version("sseserver"),
    ),
    "sseserver-redis": ServerSpec(
        "sseserver-redis",
        "sseserver",
        ("fanout",),
        _sseserver_argv,  # + --hub redis://127.0.0.1:PORT/0 (Bench.server)
        available=_redis_available,
        version=lambda: (
            f"{_pkg_version('sseserver')}, redis-py {_pkg_version('redis')}, "
            + " ".join(_command_version([REDIS_SERVER or "redis-server", "--version"]).split()[:3])
        ),
        redis=True,
    ),
    "uvicorn": ServerSpec(
        "uvicorn",
        "peer",
        DEFAULT_SCENARIOS,
        lambda port, tmp: [PY, str(PEERS / "uvicorn_sse.py"), "--port", str(port)],
        available=_python_peer("uvicorn", "uvicorn", "sse-starlette", "httptools", "uvloop"),
        version=lambda: (
            f"uvicorn {_pkg_version('uvicorn')}, sse-starlette {_pkg_version('sse-starlette')}"
        ),
    ),
    "aiohttp": ServerSpec(
        "aiohttp",
        "peer",
        DEFAULT_SCENARIOS,
        lambda port, tmp: [PY, str(PEERS / "aiohttp_sse.py"), "--port", str(port)],
        available=_python_peer("aiohttp", "aiohttp", "uvloop"),
        version=lambda: f"aiohttp {_pkg_version('aiohttp')}",
    ),
    "node": ServerSpec(
        "node",
        "peer",
        DEFAULT_SCENARIOS,
        lambda port, tmp: [NODE, str(PEERS / "node_sse.js"), "--port", str(port)],
        available=lambda: None if Path(NODE).exists() else "node not installed",
        version=lambda: f"node {_command_version([NODE, '--version'])}",
    ),
    "nchan": ServerSpec(
        "nchan",
        "nchan",
        ("idle", "fanout"),
        _nchan_argv,
        available=lambda: (
            None
            if Path(NGINX).exists() and NCHAN_MODULE.exists()
            else "nginx or its nchan module not installed"
        ),
        version=lambda: _command_version([NGINX, "-v"]) + " + nchan",
    ),
}


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(
    port: int, target: str, timeout: float = 5.0, accept: str = "*/*"
) -> tuple[int, bytes]:
    """A blocking HTTP/1.1 GET that reads until the server closes (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return int(data[9:12]), data
    except ValueError:
        return 0, data


def peek_stream(port: int, target: str, timeout: float = 5.0) -> int:
    """Open a stream that does not end by itself (a subscription), read its response head,
    close it; the status (0: no head within ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            "\r\n".encode()
        )
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return int(data[9:12])
    except ValueError:
        return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class Server:
    """A server process pinned to the server core; stopped by PID."""

    def __init__(
        self,
        spec: ServerSpec,
        say: Callable[[str], None],
        extra_args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{spec.name}-"))
        self.log_path = self.tmp / "server.log"
        self.say = say
        argv = [*NICE, "taskset", "-c", SERVER_CORE, *spec.argv(self.port, self.tmp)]
        argv += extra_args or []
        env = dict(os.environ)
        env.update(extra_env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_raise_nofile,
        )
        self.pid = self.proc.pid  # taskset execs the server: same PID
        self.measure_pid = self.pid
        self.redis: RedisServer | None = None  # set by Bench.server for a spec.redis server
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited: {self.log_tail()}")
            try:
                status, _ = http_get(self.port, "/healthz", timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{self.spec.name} not ready in {timeout_s}s: {self.log_tail()}")
        while self.spec.redis:  # /readyz answers 200 once the Redis hub is connected
            try:
                status, _ = http_get(self.port, "/readyz", timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.name}: Redis hub not ready: {self.log_tail()}")
            time.sleep(0.1)
        if self.spec.flavor == "nchan":
            kids = children(self.pid)
            if kids:
                self.measure_pid = kids[0]  # the one worker process serves every connection
        self.warm_up()

    def warm_up(self) -> None:
        """A few requests so lazy imports and first-use allocations happen before we
        measure the server at rest."""
        for _ in range(5):
            http_get(self.port, "/healthz")
        if self.spec.flavor != "nchan":
            for _ in range(3):
                http_get(self.port, "/v1/stream?tokens=3&interval_ms=0", accept="text/event-stream")
        for _ in range(3):  # and the subscription path (a topic of its own)
            peek_stream(self.port, sub_target(self.spec.flavor, "warmup"))
        time.sleep(0.3)

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        pids = [self.pid, *children(self.pid)]
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.say(f"{self.spec.name} did not stop in 8 s after SIGTERM: SIGKILL")
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in pids[1:]:  # nginx workers exit with their master; make sure
            if pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class RedisServer:
    """A private ``redis-server`` for sseserver-redis: a free loopback port, no persistence
    (``--save '' --appendonly no``), pinned to the load generator's core (its CPU is
    measured there as ``redis_util`` and not counted as noise); stopped by its PID."""

    def __init__(self, say: Callable[[str], None], timeout_s: float = 10.0) -> None:
        self.say = say
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self._log = open(self.tmp / "redis.log", "wb")
        self.proc = subprocess.Popen(
            [
                *(*NICE, "taskset", "-c", LOADGEN_CORE, REDIS_SERVER),
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--daemonize", "no", "--dir", str(self.tmp)),
            ],
            cwd=self.tmp,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_raise_nofile,
        )
        self.pid = self.proc.pid  # taskset execs redis-server: same PID
        self.url = f"redis://127.0.0.1:{self.port}/0"
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready in {timeout_s}s: {self.log_tail()}")

    def log_tail(self, n: int = 800) -> str:
        try:
            return (self.tmp / "redis.log").read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.say("redis-server did not stop in 8 s after SIGTERM: SIGKILL")
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


UPSTREAMS = {
    # the fake of the tests: records connections (/_fake/stats), every failure mode; slow
    "python": [PY, "-m", "tests.upstreams.openai_wire"],
    # bench/peers/openai_upstream.js: same wire format and token texts, streams only; fast
    "node": [NODE, str(PEERS / "openai_upstream.js")],
}


class Upstream:
    """A fake OpenAI upstream in its own process, pinned to the load generator's core
    (the proxy loads are sequential): ``python``, the fake of the tests
    (tests/upstreams/openai_wire.py), or ``node`` (bench/peers/openai_upstream.js)."""

    def __init__(self, kind: str = "python", timeout_s: float = 15.0) -> None:
        self.kind = kind
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*NICE, "taskset", "-c", LOADGEN_CORE, *UPSTREAMS[kind], "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_raise_nofile,
        )
        self.pid = self.proc.pid  # taskset execs the upstream: same PID
        line = self._first_line(timeout_s)
        if not line.startswith("LISTENING"):
            self.stop()
            raise RuntimeError(f"fake OpenAI upstream ({kind}) did not start: {line.strip()!r}")

    def _first_line(self, timeout_s: float) -> str:
        """Its first output line, read within ``timeout_s``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").partition("\n")[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


OPENAI_Q = "/v1/stream?provider=openai&model=gpt-4o-mini&q=hi%20%5Bfake%20{}%5D"
OPENAI_BODY = (
    '{"model":"gpt-4o-mini","stream":true,'
    '"messages":[{"role":"user","content":"hi [fake tokens=1]"}]}'
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
        redis = RedisServer(self.say) if spec.redis else None
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
            *NICE,
            "taskset",
            "-c",
            LOADGEN_CORE,
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
        spy = self._start_profile(srv) if profile_as else None
        try:
            out = subprocess.run(
                argv,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                timeout=timeout_s,
                preexec_fn=_raise_nofile,
                check=False,
            )
        finally:
            if spy is not None:
                self._stop_profile(spy, profile_as)
        lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"loadgen {scenario} failed (exit {out.returncode})")
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.spec.name} died during {scenario}: {srv.log_tail()}")
        if srv.redis is not None and srv.redis.proc.poll() is not None:
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

    # -- profiling (py-spy) --------------------------------------------------------------

    def _start_profile(self, srv: Server) -> tuple[subprocess.Popen[bytes], Path] | None:
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

    def _stop_profile(self, spy: tuple[subprocess.Popen[bytes], Path], name: str) -> None:
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
            self.say(f"profile written to bench/results/profile_{name}.txt")

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

    # -- scenarios -------------------------------------------------------------------------

    def idle(self, name: str) -> None:
        """N streams held open with nothing to send, of each kind in ``idle_kinds``:
        generations (/v1/stream with a far first token: recorded as ``idle``) and
        subscriptions to one topic nobody publishes to (recorded as ``idle-sub``). nchan
        has no generations: it runs the subscriptions only."""
        for kind in self.idle_kinds:
            if kind == "generations" and SERVERS[name].flavor == "nchan":
                continue
            scenario = IDLE_KINDS[kind]
            for n in self.settings.idle_streams:
                self.idle_one(name, kind, scenario, n)

    def idle_one(self, name: str, kind: str, scenario: str, n: int) -> None:
        variant = f"{n // 1000}k"
        what = f"{name} {scenario} {variant}"
        self.say(f"{what}: opening {n} idle {kind}")

        def attempt() -> dict[str, Any]:
            with self.server(name) as srv:
                return self.loadgen(
                    srv,
                    "idle",
                    [
                        *("--streams", n, "--idle-kind", kind),
                        *("--settle-s", self.settings.settle_s, "--max-s", 180),
                    ],
                    timeout_s=400,
                    profile_as=f"{scenario.replace('-', '_')}_{variant}" if self.profile else "",
                )

        r = self.measure(what, attempt, lambda r: False)
        self.say(
            f"{what}: {r['held']} {kind} held, {r['rss_per_stream_kb']:.2f} KB/stream, "
            f"{r['opened_per_s']:.0f} opened/s, {r['failures']} failures"
            + (f" [capped by {r['capped_by']}]" if r.get("capped_by") else "")
        )
        self.record(scenario, variant, name, r)

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

    def tokens(self, name: str) -> None:
        s = self.settings
        steps: list[dict[str, Any]] = []

        def step(n: int) -> bool:
            self.say(f"{name} tokens: {n} streams x {s.token_count} tokens at 50/s")

            def attempt() -> dict[str, Any]:
                with self.server(name) as srv:
                    return self.loadgen(
                        srv,
                        "tokens",
                        ["--streams", n, "--tokens", s.token_count, "--interval-ms", 20],
                        timeout_s=120 + s.token_count * 0.02 + n / 100,
                        profile_as=f"tokens_{n}" if self.profile else "",
                    )

            r = self.lateness_step(f"{name} tokens x{n}", attempt)
            steps.append(r)
            return bool(r["held"])

        held, failed_at = self.ramp(s.token_steps, s.token_bisect, 50, step)
        at_held = next((r for r in steps if r["streams"] == held and r["held"]), None)
        at_fail = next((r for r in steps if r["streams"] == failed_at), None)
        metrics = {
            "max_streams_held": held,
            "failed_at": failed_at or None,
            "p99_ms_at_held": at_held["steady_lateness_ms"].get("p99") if at_held else None,
            "p99_ms_at_held_incl_opening": at_held["lateness_ms"].get("p99") if at_held else None,
            "events_per_s_at_held": at_held["delivered_events_per_s"] if at_held else None,
            "offered_events_per_s_at_held": (at_held["offered_events_per_s"] if at_held else None),
            "first_event_p99_ms_at_held": (
                at_held["first_event_ms"].get("p99") if at_held else None
            ),
            "delivered_share_at_held": at_held["delivered_share"] if at_held else None,
            "server_util_at_held": at_held["cpu"].get("server_util") if at_held else None,
            "gen_util_at_held": at_held["cpu"]["gen_util"] if at_held else None,
            "gen_util_at_fail": _main_cpu(at_fail)["gen_util"] if at_fail else None,  # type: ignore[index]
            "server_util_at_fail": _main_cpu(at_fail).get("server_util") if at_fail else None,  # type: ignore[union-attr]
            "bound": LATENESS_BOUND_MS,
            "first_event_bound": FIRST_EVENT_BOUND_MS,
            "delivered_share_bound": DELIVERED_SHARE,
            "tokens_per_stream": s.token_count,
            "steps": steps,
        }
        self.record("tokens", "50/s", name, metrics)

    def fanout(self, name: str) -> None:
        s = self.settings
        redis = SERVERS[name].redis
        for n in s.redis_fanout_subscribers if redis else s.fanout_subscribers:
            for pubs in s.fanout_publishers:
                variant = f"{n // 1000}k x{pubs}pub"
                self.say(f"{name} fanout {variant}")

                def attempt(n: int = n, pubs: int = pubs) -> dict[str, Any]:
                    with self.server(name) as srv:
                        return self.loadgen(
                            srv,
                            "fanout",
                            [
                                *("--subscribers", n, "--publishers", pubs),
                                *("--duration-s", s.fanout_duration_s),
                            ],
                            timeout_s=240 + s.fanout_duration_s,
                            profile_as=f"fanout_{n // 1000}k_{pubs}pub" if self.profile else "",
                        )

                r = self.measure(f"{name} fanout {variant}", attempt, lambda r: False)
                self.say(
                    f"{name} fanout {variant}: {r['deliveries_per_s']:.0f} deliveries/s, "
                    f"p99 {r['latency_ms'].get('p99')} ms, "
                    f"{r['server_cpu_us_per_delivery']} us/delivery, "
                    f"server {r['cpu'].get('server_util', 0):.0%} / "
                    f"generator {r['cpu']['gen_util']:.0%} cpu"
                    + (f" + redis-server {r['cpu'].get('redis_util', 0):.0%}" if redis else "")
                )
                self.record("fanout", variant, name, r)

    def ttft(self, name: str) -> None:
        self.say(f"{name} ttft: {self.settings.ttft_requests} fresh + keep-alive requests")

        def attempt() -> dict[str, Any]:
            with self.server(name) as srv:
                return self.loadgen(
                    srv,
                    "ttft",
                    ["--requests", self.settings.ttft_requests],
                    timeout_s=300,
                    profile_as="ttft" if self.profile else "",
                )

        r = self.measure(f"{name} ttft", attempt, lambda r: False)
        self.say(
            f"{name} ttft: fresh p50 {r['fresh_ms'].get('p50')} ms / p99 "
            f"{r['fresh_ms'].get('p99')} ms, keep-alive p50 {r['keepalive_ms'].get('p50')} ms"
            f" / p99 {r['keepalive_ms'].get('p99')} ms"
        )
        self.record("ttft", "tokens=1", name, r)

    @contextlib.contextmanager
    def proxied(
        self, name: str, client: str | None = None, upstream: str = "python"
    ) -> Iterator[tuple[Server, Upstream]]:
        """sseserver with its OpenAI provider pointed at a fake upstream (``python``: the
        tests' fake, ``node``: bench/peers/openai_upstream.js), warmed up through it.
        ``client``: the ``--openai-client`` to pass (None: the server's only/default one)."""
        up = Upstream(upstream)
        try:
            args = ["--openai-base-url", f"http://127.0.0.1:{up.port}/v1"]
            if client is not None:
                args += ["--openai-client", client]
            with self.server(name, args, {"OPENAI_API_KEY": "sk-fake"}) as srv:
                for _ in range(3):  # the client and its connection pool warm up
                    _, body = http_get(
                        srv.port, OPENAI_Q.format("tokens%3D2"), accept="text/event-stream"
                    )
                    if b"tok1 " not in body:
                        raise RuntimeError(
                            f"no text through the OpenAI provider ({upstream} upstream): "
                            f"{body[-300:].decode(errors='replace')!r}"
                        )
                yield srv, up
        finally:
            up.stop()

    def proxy(self, name: str) -> None:
        """Through the OpenAI provider, for each client (``--openai-client sdk``, ``fast``):
        the TTFT it adds (against the tests' fake upstream) and the concurrent 50 token/s
        streams it holds (against bench/peers/openai_upstream.js), with server CPU per chunk."""
        for client in OPENAI_CLIENTS:
            flag, why = openai_client_arg(client)
            ttft = "openai ttft" if client == "sdk" else f"openai ttft {client}"
            variants = (ttft, f"50/s {client}")
            if why:
                self.say(f"{name} proxy {client}: skipped ({why})")
                for variant in variants:
                    self.record("proxy", variant, name, None, skipped=why)
                continue
            for variant, part in zip(variants, (self.proxy_ttft, self.proxy_streams), strict=True):
                try:
                    part(name, client, flag, variant)
                except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
                    self.say(f"{name} proxy {variant}: ERROR {exc}")
                    self.record("proxy", variant, name, None, error=str(exc)[:500])

    def proxy_ttft(self, name: str, client: str, flag: str | None, variant: str) -> None:
        """TTFT through the OpenAI provider against the tests' fake upstream, next to the
        upstream's own TTFT measured directly: the difference is what sseserver adds."""
        why = _proxy_prerequisites("python")
        if why:
            self.record("proxy", variant, name, None, skipped=why)
            return
        n = max(50, self.settings.ttft_requests // 3)
        self.say(f"{name} proxy {variant}: {n} requests via the OpenAI provider and {n} direct")

        def attempt() -> dict[str, Any]:
            with self.proxied(name, flag) as (srv, up):
                via = self.loadgen(
                    srv,
                    "ttft",
                    ["--requests", n, "--target", OPENAI_Q.format("tokens%3D1")],
                    timeout_s=300,
                    profile_as=f"proxy_ttft_{client}" if self.profile else "",
                )
                direct = self.loadgen(
                    srv,
                    "ttft",
                    [
                        *("--requests", n, "--target", "/v1/chat/completions"),
                        *("--body", OPENAI_BODY, "--marker", '"content":"tok'),
                    ],
                    timeout_s=300,
                    port=up.port,
                    pid=up.pid,
                )
            out: dict[str, Any] = {
                "client": client,
                "via": via,
                "direct": direct,
                "cpu": via.get("cpu_keepalive"),
            }
            for kind in ("fresh_ms", "keepalive_ms"):
                for p in ("p50", "p99"):
                    v, d = via[kind].get(p), direct[kind].get(p)
                    if v is not None and d is not None:
                        out[f"added_{kind[:-3]}_{p}_ms"] = round(v - d, 3)
            return out

        r = self.measure(f"{name} proxy {variant}", attempt, lambda r: False)
        self.say(
            f"{name} proxy {variant}: keep-alive TTFT p50 {r['via']['keepalive_ms'].get('p50')} "
            f"ms via sseserver vs {r['direct']['keepalive_ms'].get('p50')} ms direct "
            f"(added p50 {r.get('added_keepalive_p50_ms')} ms, "
            f"p99 {r.get('added_keepalive_p99_ms')} ms)"
        )
        self.record("proxy", variant, name, r)

    def proxy_streams(self, name: str, client: str, flag: str | None, variant: str) -> None:
        """Concurrent 50 token/s streams of ``/v1/stream?provider=openai`` against the Node
        upstream (pinned to core 1 next to the load generator), ramped like ``tokens``:
        the largest count held, server CPU per chunk, and with ``--profile`` a py-spy
        profile of the count held (run once more under py-spy, after the ramp)."""
        why = _proxy_prerequisites("node")
        if why:
            self.record("proxy", variant, name, None, skipped=why)
            return
        s = self.settings
        target = OPENAI_Q.format(f"tokens%3D{s.token_count}%20interval_ms%3D20")
        steps: list[dict[str, Any]] = []

        def run_step(n: int, profile_as: str = "") -> dict[str, Any]:
            def attempt() -> dict[str, Any]:
                with self.proxied(name, flag, "node") as (srv, up):
                    r = self.loadgen(
                        srv,
                        "tokens",
                        [
                            *("--streams", n, "--tokens", s.token_count, "--interval-ms", 20),
                            *("--target", target, "--upstream-pid", up.pid),
                        ],
                        timeout_s=120 + s.token_count * 0.02 + n / 100,
                        profile_as=profile_as,
                    )
                return _per_chunk(r)

            return self.lateness_step(
                f"{name} proxy {client} x{n}" + (" under py-spy" if profile_as else ""),
                attempt,
                profiled=bool(profile_as),
                extra=lambda r: (
                    f"; steady window: server {(_main_cpu(r) or {}).get('server_util', 0):.0%},"
                    f" upstream {(_main_cpu(r) or {}).get('upstream_util', 0):.0%} cpu (core 1),"
                    f" server {r.get('server_cpu_us_per_chunk')} µs cpu per chunk"
                ),
            )

        def step(n: int) -> bool:
            self.say(
                f"{name} proxy {client}: {n} streams x {s.token_count} tokens at 50/s "
                "through the OpenAI provider (Node upstream)"
            )
            r = run_step(n)
            steps.append(r)
            return bool(r["held"])

        held, failed_at = self.ramp(s.proxy_steps, s.proxy_bisect, 25, step)
        at_held = next((r for r in steps if r["streams"] == held and r["held"]), None)
        at_fail = next((r for r in steps if r["streams"] == failed_at), None)
        # CPU per chunk at the count held, else at the smallest count tried.
        basis = at_held or min(steps, key=lambda r: r["streams"], default=None)
        cpu_held = _main_cpu(at_held) if at_held else None
        cpu_fail = _main_cpu(at_fail) if at_fail else None
        profile = None
        if self.profile and basis is not None:
            profile = self.proxy_profile(client, basis, run_step)
        metrics = {
            "client": client,
            "client_option": flag is not None,
            "upstream": "bench/peers/openai_upstream.js (Node), pinned to core 1 next to the "
            "load generator (its CPU: upstream_util)",
            "max_streams_held": held,
            "failed_at": failed_at or None,
            "p99_ms_at_held": at_held["steady_lateness_ms"].get("p99") if at_held else None,
            "p99_ms_at_held_incl_opening": at_held["lateness_ms"].get("p99") if at_held else None,
            "events_per_s_at_held": at_held["delivered_events_per_s"] if at_held else None,
            "offered_events_per_s_at_held": (at_held["offered_events_per_s"] if at_held else None),
            "first_event_p99_ms_at_held": (
                at_held["first_event_ms"].get("p99") if at_held else None
            ),
            "delivered_share_at_held": at_held["delivered_share"] if at_held else None,
            "server_cpu_us_per_chunk": basis.get("server_cpu_us_per_chunk") if basis else None,
            "server_cpu_us_per_chunk_incl_setup": (
                basis.get("server_cpu_us_per_chunk_incl_setup") if basis else None
            ),
            "server_cpu_us_per_chunk_at": basis["streams"] if basis else None,
            "server_cpu_us_per_chunk_at_fail": (
                at_fail.get("server_cpu_us_per_chunk") if at_fail else None
            ),
            "server_util_at_held": cpu_held.get("server_util") if cpu_held else None,
            "gen_util_at_held": cpu_held.get("gen_util") if cpu_held else None,
            "upstream_util_at_held": cpu_held.get("upstream_util") if cpu_held else None,
            "server_util_at_fail": cpu_fail.get("server_util") if cpu_fail else None,
            "gen_util_at_fail": cpu_fail.get("gen_util") if cpu_fail else None,
            "upstream_util_at_fail": cpu_fail.get("upstream_util") if cpu_fail else None,
            "cpu": cpu_held,
            "bound": LATENESS_BOUND_MS,
            "first_event_bound": FIRST_EVENT_BOUND_MS,
            "delivered_share_bound": DELIVERED_SHARE,
            "tokens_per_stream": s.token_count,
            "steps": steps,
            "profile": profile,
        }
        # The ramp itself ran without py-spy (the profile is a separate run): not profiled.
        self.record("proxy", variant, name, metrics, profiled=False)

    def proxy_profile(
        self,
        client: str,
        basis: dict[str, Any],
        run_step: Callable[[int, str], dict[str, Any]],
    ) -> dict[str, Any] | None:
        """The ramp's held count (else its smallest) once more, under py-spy: writes
        bench/results/profile_proxy_CLIENT.txt, headed by that run's CPU per chunk."""
        n = basis["streams"]
        name = f"proxy_{client}"
        self.say(f"proxy {client}: {n} streams once more under py-spy")
        try:
            r = run_step(n, name)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.say(f"proxy {client}: profiled run failed: {exc}")
            return {"streams": n, "error": str(exc)[:500]}
        cpu = _main_cpu(r) or {}
        out = {
            "streams": n,
            "file": f"bench/results/profile_{name}.txt",
            "held": r["held"],
            "p99_ms": r["steady_lateness_ms"].get("p99"),
            "server_cpu_us_per_chunk": r.get("server_cpu_us_per_chunk"),
            "server_util": cpu.get("server_util"),
        }
        path = RESULTS / f"profile_{name}.txt"
        if path.exists():
            head = (
                f"proxy, --openai-client {client}: {n} streams x {r['tokens']} tokens at 50/s "
                "through the OpenAI provider against bench/peers/openai_upstream.js; py-spy "
                "samples the whole step (1 s of opening, the steady state, the ends).\n"
                f"This run, under py-spy: server CPU {r.get('server_cpu_us_per_chunk')} µs per "
                f"chunk in the steady window ({cpu.get('server_util', 0):.0%} of core 0), "
                f"steady p99 lateness {out['p99_ms']} ms; without py-spy at this count: "
                f"{basis.get('server_cpu_us_per_chunk')} µs per chunk. A share below times "
                "the µs per chunk is that frame's µs per chunk.\n\n"
            )
            path.write_text(head + path.read_text())
        return out

    def cancel(self, name: str) -> None:
        """Client disconnect -> upstream connection closed, measured by the fake upstream
        at its socket (SPEC §7: within 100 ms)."""
        why = _proxy_prerequisites("python")
        if why:
            self.record("cancel", "openai", name, None, skipped=why)
            return
        n = max(30, self.settings.ttft_requests // 6)
        self.say(f"{name} cancel: {n} streams disconnected after their first token")

        def attempt() -> dict[str, Any]:
            with self.proxied(name) as (srv, up):
                return self.loadgen(
                    srv,
                    "cancel",
                    [
                        *("--requests", n, "--upstream-port", up.port),
                        *("--target", OPENAI_Q.format("tokens%3D100000%20interval_ms%3D20")),
                    ],
                    timeout_s=300,
                )

        r = self.measure(f"{name} cancel", attempt, lambda r: False)
        self.say(
            f"{name} cancel: upstream closed p50 {r['cancel_ms'].get('p50')} ms, "
            f"p99 {r['cancel_ms'].get('p99')} ms after the client left; "
            f"{r['over_100ms']} over 100 ms, {r['not_closed_within_s']['count']} not closed"
        )
        self.record("cancel", "openai", name, r)


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


OPENAI_CLIENTS = ("sdk", "fast")  # sseserver --openai-client (SSESERVER_OPENAI_CLIENT)


@functools.cache
def openai_client_option() -> bool:
    """Whether this sseserver has ``--openai-client`` (``python -m sseserver --help``)."""
    try:
        out = subprocess.run(
            [PY, "-m", "sseserver", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return "--openai-client" in out.stdout


def openai_client_arg(client: str) -> tuple[str | None, str | None]:
    """(the ``--openai-client`` value to pass or None, why ``client`` cannot run or None).
    A server without the option has only the SDK client: ``sdk`` runs without the flag."""
    if openai_client_option():
        return client, None
    if client == "sdk":
        return None, None
    return None, (
        f"sseserver has no --openai-client option yet (python -m sseserver --help), so no "
        f"{client!r} client: only the openai SDK path exists"
    )


def _per_chunk(r: dict[str, Any]) -> dict[str, Any]:
    """Add CPU µs per chunk to a loadgen ``tokens`` result through the OpenAI provider.

    A chunk is one upstream content delta, which is one text event to the client: in the
    steady window (every stream open, none ended) there are no other chunks. The steady
    figure is CPU over that window / text events read in it; ``_incl_setup`` divides the
    whole step's CPU (opening the streams and their upstream requests, the ends) by every
    text event."""
    steady, whole = r.get("cpu_steady") or {}, r.get("cpu") or {}
    n, total = r.get("steady_received") or 0, r.get("received") or 0
    for who in ("server", "upstream"):
        cpu_s = steady.get(f"{who}_cpu_s")
        r[f"{who}_cpu_us_per_chunk"] = round(cpu_s / n * 1e6, 1) if cpu_s and n else None
        cpu_s = whole.get(f"{who}_cpu_s")
        r[f"{who}_cpu_us_per_chunk_incl_setup"] = (
            round(cpu_s / total * 1e6, 1) if cpu_s and total else None
        )
    return r


def _proxy_prerequisites(upstream: str = "python") -> str | None:
    """None when the proxy scenarios can run against ``upstream``, else why not."""
    if _pkg_version("openai") == "?":
        return "needs the openai package"
    if upstream == "python" and not (ROOT / "tests" / "upstreams" / "openai_wire.py").exists():
        return "needs tests/upstreams/openai_wire.py (the fake OpenAI upstream)"
    if upstream == "node" and not Path(NODE).exists():
        return "needs node for bench/peers/openai_upstream.js (the fast fake OpenAI upstream)"
    return None


# -- profiles --------------------------------------------------------------------------------


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


# -- report ----------------------------------------------------------------------------------


def _get(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)  # type: ignore[assignment]
    return d


# (scenario, label, metric path, better: "low"/"high"/"", format); "proxy@50/s": only
# the proxy variants starting with "50/s"
PROXY_TTFT = "proxy@openai ttft"
PROXY_STREAMS = "proxy@50/s"
METRICS: list[tuple[str, str, str, str, str]] = [
    ("idle", "streams held", "held", "high", "{:,.0f}"),
    ("idle", "RSS per open stream, KB", "rss_per_stream_kb", "low", "{:.2f}"),
    ("idle", "streams per GiB of RSS", "streams_per_gib", "high", "{:,.0f}"),
    ("idle", "streams opened per s", "opened_per_s", "high", "{:,.0f}"),
    ("idle", "failures", "failures", "low", "{:,.0f}"),
    ("tokens", "max streams, p99 lateness ≤ 50 ms", "max_streams_held", "high", "{:,}"),
    ("tokens", "p99 lateness at that count, ms", "p99_ms_at_held", "", "{:.1f}"),
    ("tokens", "first failing count", "failed_at", "", "{:,}"),
    ("tokens", "generator CPU at failing count", "gen_util_at_fail", "", "{:.0%}"),
    ("fanout", "deliveries per s", "deliveries_per_s", "high", "{:,.0f}"),
    ("fanout", "publishes per s", "publishes_per_s", "high", "{:,.0f}"),
    ("fanout", "delivery latency p50, ms", "latency_ms.p50", "low", "{:.1f}"),
    ("fanout", "delivery latency p99, ms", "latency_ms.p99", "low", "{:.1f}"),
    ("fanout", "server CPU µs per delivery", "server_cpu_us_per_delivery", "low", "{:.2f}"),
    ("fanout", "server / generator CPU", "cpu", "", "util"),
    ("fanout", "lost events / dropped subscribers", "lost", "", "lost"),
    ("ttft", "fresh connection p50, ms", "fresh_ms.p50", "low", "{:.3f}"),
    ("ttft", "fresh connection p99, ms", "fresh_ms.p99", "low", "{:.3f}"),
    ("ttft", "keep-alive p50, ms", "keepalive_ms.p50", "low", "{:.3f}"),
    ("ttft", "keep-alive p99, ms", "keepalive_ms.p99", "low", "{:.3f}"),
    (PROXY_TTFT, "TTFT via server, keep-alive p50, ms", "via.keepalive_ms.p50", "low", "{:.3f}"),
    (PROXY_TTFT, "upstream alone, keep-alive p50, ms", "direct.keepalive_ms.p50", "", "{:.3f}"),
    (PROXY_TTFT, "added TTFT keep-alive p50, ms", "added_keepalive_p50_ms", "low", "{:.3f}"),
    (PROXY_TTFT, "added TTFT keep-alive p99, ms", "added_keepalive_p99_ms", "low", "{:.3f}"),
    (PROXY_TTFT, "added TTFT fresh connection p50, ms", "added_fresh_p50_ms", "low", "{:.3f}"),
    (PROXY_STREAMS, "max streams, p99 lateness ≤ 50 ms", "max_streams_held", "high", "{:,}"),
    (PROXY_STREAMS, "p99 lateness at that count, ms", "p99_ms_at_held", "", "{:.1f}"),
    (PROXY_STREAMS, "first failing count", "failed_at", "", "{:,}"),
    (PROXY_STREAMS, "server CPU µs per chunk there", "server_cpu_us_per_chunk", "low", "{:.1f}"),
    (PROXY_STREAMS, "server CPU there (core 0)", "server_util_at_held", "", "{:.0%}"),
    (PROXY_STREAMS, "upstream CPU there (core 1)", "upstream_util_at_held", "", "{:.0%}"),
    ("cancel", "disconnect → upstream closed p50, ms", "cancel_ms.p50", "low", "{:.1f}"),
    ("cancel", "disconnect → upstream closed p99, ms", "cancel_ms.p99", "low", "{:.1f}"),
    ("cancel", "over 100 ms / not closed in 2 s", "over_100ms", "", "{:,}"),
]
# idle-sub (subscriptions) has the rows of idle (generations)
METRICS += [("idle-sub", *m[1:]) for m in METRICS if m[0] == "idle"]

# What a row holds, after "scenario variant": the two idle kinds side by side.
ROW_KINDS = {"idle": "generations", "idle-sub": "subscriptions"}


def row_name(scenario: str, variant: str) -> str:
    """``idle 10k (generations)``, ``idle-sub 10k (subscriptions)``, ``fanout 1k x1pub``."""
    kind = ROW_KINDS.get(scenario)
    return f"{scenario} {variant}" + (f" ({kind})" if kind else "")


def latest_records(mode: str) -> list[dict[str, Any]]:
    """The newest record of each (scenario, variant, server) of ``mode`` (profiled runs
    left out: sampling slows the server)."""
    path = RESULTS / "results.jsonl"
    newest: dict[tuple[str, str, str], dict[str, Any]] = {}
    order: dict[tuple[str, str, str], int] = {}
    if path.exists():
        for i, line in enumerate(path.read_text().splitlines()):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("mode") == mode and not rec.get("profiled"):
                if rec["scenario"] == "idle" and rec["server"] == "nchan":
                    # nchan's idle streams have always been subscriptions (it has no
                    # generations): records from before idle-sub existed belong there
                    rec["scenario"] = "idle-sub"
                key = (rec["scenario"], rec["variant"], rec["server"])
                newest[key], order[key] = rec, i
    # A whole scenario skipped or failed (variant "-") and measured since: not reported.
    since: dict[tuple[str, str], int] = {}
    for (scenario, variant, server), i in order.items():
        if variant != "-":
            since[(scenario, server)] = max(i, since.get((scenario, server), -1))
    return [
        rec
        for key, rec in newest.items()
        if key[1] != "-" or since.get((key[0], key[2]), -1) < order[key]
    ]


def _cell(metrics: dict[str, Any], path: str, fmt: str) -> tuple[str, float | None]:
    if fmt == "util":
        cpu = metrics.get("cpu") or {}
        if "server_util" not in cpu:
            return "—", None
        return _util_text(cpu), None
    if fmt == "lost":
        if "lost" not in metrics:
            return "—", None
        return f"{metrics['lost']:,} / {metrics.get('dropped_subscribers', 0):,}", None
    value = _get(metrics, path)
    if value is None:
        return "—", None
    return fmt.format(value), float(value)


def _util_text(cpu: dict[str, Any]) -> str:
    """``server / generator`` CPU share, then what else ran on the generator's core:
    ``+ upstream N%`` (proxy), ``+ redis-server N%`` (sseserver-redis)."""
    text = f"{cpu.get('server_util', 0):.0%} / {cpu['gen_util']:.0%}"
    if "upstream_util" in cpu:
        text += f" + upstream {cpu['upstream_util']:.0%}"
    if "redis_util" in cpu:
        text += f" + redis-server {cpu['redis_util']:.0%}"
    return text


def write_report(records: list[dict[str, Any]], settings: Settings) -> Path:
    servers = [s for s in ALL_SERVERS if any(r["server"] == s for r in records)]
    by_key = {(r["scenario"], r["variant"], r["server"]): r for r in records}
    groups: list[tuple[str, str]] = []
    for r in sorted(
        records,
        key=lambda r: (REPORT_SCENARIOS.index(r["scenario"]), _variant_order(r["variant"])),
    ):
        if (r["scenario"], r["variant"]) not in groups:
            groups.append((r["scenario"], r["variant"]))
    lines = [
        "# sseserver benchmarks, side by side",
        "",
        f"Mode `{settings.mode}`, written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
        f"`python -m bench.run --{settings.mode}` (newest result of each cell from "
        "`results.jsonl`).",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Linux {platform.release()}, Python {platform.python_version()}; server pinned to "
        f"core {SERVER_CORE}, load generator to core {LOADGEN_CORE}; loopback only; a shared, "
        "noisy machine (per-core busy time is in each JSON record as `cpu0_busy`/`cpu1_busy`).",
        "",
        "Each cell: the value, then its ratio to sseserver's (x). For rows marked ↓ lower "
        "is better, ↑ higher is better. `—`: not measured (nchan has no /v1/stream; "
        "sseserver-redis runs fan-out only).",
        "",
        "`idle N (generations)`: N `/v1/stream` generations held with the first token 10 "
        "minutes away (each a running generation: producer task, provider call, history). "
        "`idle-sub N (subscriptions)`: N subscriptions to one topic nobody publishes to "
        "(sseserver `/.well-known/mercure?topic=idle`, the peers `/sub?topic=idle`, nchan "
        "`/sub/idle`). nchan has no generations: its idle numbers are subscriptions and sit "
        "in the idle-sub rows only.",
        "",
        "`sseserver-redis`: sseserver with `--hub redis://…` against a private `redis-server` "
        "(no persistence) that runs on core 1 next to the load generator; its CPU is shown as "
        "`+ redis-server N%` after the generator's. Its ratios compare the Redis hub with "
        "sseserver's in-memory hub.",
        "",
    ]
    header = "| scenario | metric | " + " | ".join(servers) + " |"
    lines += [header, "|" + "---|" * (len(servers) + 2)]
    for scenario, variant in groups:
        group = [by_key.get((scenario, variant, server)) for server in servers]
        if not any(rec and (rec["ok"] or rec.get("error")) for rec in group):
            dashes = " | ".join("—" for _ in servers)
            lines.append(f"| {row_name(scenario, variant)} | not measured (below) | {dashes} |")
            continue
        for scen, label, path, better, fmt in METRICS:
            scen, _, prefix = scen.partition("@")
            if scen != scenario or not variant.startswith(prefix):
                continue
            base_rec = by_key.get((scenario, variant, "sseserver"))
            base = _cell(base_rec["metrics"], path, fmt)[1] if base_rec else None
            cells = []
            for server in servers:
                rec = by_key.get((scenario, variant, server))
                if rec is None or not rec["ok"]:
                    reason = (rec or {}).get("error") or (rec or {}).get("skipped")
                    cells.append("error" if reason and rec and rec.get("error") else "—")
                    continue
                text, value = _cell(rec["metrics"], path, fmt)
                if better and server != "sseserver" and value is not None and base not in (None, 0):
                    text += f" (x{value / base:.2f})"
                cells.append(text)
            arrow = {"low": " ↓", "high": " ↑"}.get(better, "")
            lines.append(
                f"| {row_name(scenario, variant)} | {label}{arrow} | " + " | ".join(cells) + " |"
            )
    skipped = [r for r in records if r.get("skipped")]
    errors = [r for r in records if r.get("error")]
    if skipped or errors:
        lines += ["", "Not measured:", ""]
        for r in skipped:
            variant = "" if r["variant"] == "-" else f" {r['variant']}"
            lines.append(f"- {r['scenario']}{variant} ({r['server']}): {r['skipped']}")
        for r in errors:
            lines.append(f"- {r['scenario']} {r['variant']} ({r['server']}): error: {r['error']}")
    lines += ["", "## Is the load generator the bottleneck?", ""]
    lines.append(
        "CPU share of its core over each measured window: server (core 0) and generator "
        "(core 1). A generator near 100% means that row measures the generator, not the "
        "server. `noise`: share of a core other programs took in that window (runs with more "
        f"than {NOISE_LIMIT:.0%} are measured again, up to {RETRIES} times, keeping the "
        "least noisy)."
    )
    lines += ["", "| scenario | " + " | ".join(servers) + " |", "|" + "---|" * (len(servers) + 1)]
    for scenario, variant in groups:
        if scenario == "tokens":
            continue
        cells = []
        for server in servers:
            rec = by_key.get((scenario, variant, server))
            cpu = None
            if rec and rec["ok"]:
                m = rec["metrics"]
                cpu = m.get("cpu") or m.get("cpu_open") or m.get("cpu_fresh")
            if not cpu:
                cells.append("—")
            else:
                text = _util_text(cpu)
                if noise(cpu) > 0.1:
                    text += f" (noise {noise(cpu):.0%})"
                cells.append(text)
        lines.append(f"| {row_name(scenario, variant)} | " + " | ".join(cells) + " |")
    tok = [r for r in records if r["scenario"] == "tokens" and r["ok"]]
    if tok:
        lines += [
            "",
            "Token streams, each step: streams: steady-state p99 lateness in ms (server / "
            "generator CPU over the steady window):",
            "",
        ]
        for r in sorted(tok, key=lambda r: servers.index(r["server"])):
            lines.append(f"- {r['server']}: " + "; ".join(_step_texts(r)))
    ramps = [r for r in records if r["scenario"] == "proxy" and r["ok"] and "steps" in r["metrics"]]
    if ramps:
        lines += [
            "",
            "Streams through the OpenAI provider (`/v1/stream?provider=openai`) against "
            "`bench/peers/openai_upstream.js` (Node), which runs on core 1 next to the load "
            "generator; each step: streams: steady-state p99 lateness in ms (server / "
            "generator / upstream CPU over the steady window, server CPU µs per chunk):",
            "",
        ]
        for r in sorted(ramps, key=lambda r: _variant_order(r["variant"])):
            lines.append(f"- {r['server']} {r['variant']}: " + "; ".join(_step_texts(r)))
    lines += ["", "Versions: " + "; ".join(f"{s}: {SERVERS[s].version()}" for s in servers), ""]
    charts = [p.name for p in sorted(RESULTS.glob("*.png"))]
    if charts:
        lines += ["Charts: " + ", ".join(f"[{c}]({c})" for c in charts), ""]
    report = RESULTS / "RESULTS.md"
    report.write_text("\n".join(lines))
    return report


def _step_texts(r: dict[str, Any]) -> list[str]:
    """One short text per step of a lateness ramp (tokens, proxy 50/s)."""
    parts = []
    for st in r["metrics"].get("steps", []):
        cpu = st.get("cpu_steady") or st["cpu"]
        lat = st.get("steady_lateness_ms") or st["lateness_ms"]
        util = f"{cpu.get('server_util', 0):.0%}/{cpu['gen_util']:.0%}"
        if "upstream_util" in cpu:
            util += f"/{cpu['upstream_util']:.0%}"
        if st.get("server_cpu_us_per_chunk") is not None:
            util += f", {st['server_cpu_us_per_chunk']:.0f} µs"
        parts.append(
            f"{st['streams']}: {lat.get('p99', '—')} ({util})"
            + ("" if st["held"] else f" ✗ (lost {st['lost']})")
        )
    return parts


def write_charts(records: list[dict[str, Any]]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    servers = [s for s in ALL_SERVERS if any(r["server"] == s for r in records)]
    colors = dict(zip(ALL_SERVERS, ["C3", "C5", "C0", "C2", "C1", "C4"], strict=True))

    idle = [r for r in records if r["scenario"] in ROW_KINDS and r["ok"]]
    if idle:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for server in servers:
            for r in (r for r in idle if r["server"] == server):
                pts = sorted(r["metrics"].get("curve", []))
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] / 1024 for p in pts],
                        marker=".",
                        ls="-" if r["scenario"] == "idle" else "--",
                        color=colors[server],
                        label=f"{server} {r['variant']} {ROW_KINDS[r['scenario']]}",
                    )
        ax.set_xlabel("open idle streams")
        ax.set_ylabel("server RSS, MB")
        ax.set_title("Capacity: server memory vs open streams (dashed: subscriptions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, "capacity.png"))

    tok = [r for r in records if r["scenario"] == "tokens" and r["ok"]]
    if tok:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in sorted(tok, key=lambda r: servers.index(r["server"])):
            steps = sorted(r["metrics"].get("steps", []), key=lambda s: s["streams"])
            lats = [(s["streams"], s.get("steady_lateness_ms") or s["lateness_ms"]) for s in steps]
            lats = [(n, lat) for n, lat in lats if lat.get("n")]
            xs = [n for n, _ in lats]
            p99 = [max(0.01, lat["p99"]) for _, lat in lats]
            p50 = [max(0.01, lat["p50"]) for _, lat in lats]
            c = colors[r["server"]]
            ax.plot(xs, p99, marker="o", color=c, label=f"{r['server']} p99")
            ax.plot(xs, p50, marker=".", ls=":", color=c, label=f"{r['server']} p50")
        ax.axhline(LATENESS_BOUND_MS, color="k", ls="--", lw=1, label="50 ms bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams at 50 tokens/s")
        ax.set_ylabel("token lateness, ms")
        ax.set_title("Latency: token lateness vs concurrent streams")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, "tokens_latency.png"))

    fan = [r for r in records if r["scenario"] == "fanout" and r["ok"]]
    if fan:
        variants = sorted({r["variant"] for r in fan}, key=_variant_order)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            xs, rate, p99 = [], [], []
            for j, v in enumerate(variants):
                rec = next((r for r in fan if r["server"] == server and r["variant"] == v), None)
                if rec:
                    xs.append(j + i * width)
                    rate.append(rec["metrics"]["deliveries_per_s"] / 1000)
                    p99.append(rec["metrics"]["latency_ms"].get("p99") or 0)
            ax1.bar(xs, rate, width, color=colors[server], label=server)
            ax2.bar(xs, p99, width, color=colors[server], label=server)
        for ax in (ax1, ax2):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], variants)
            ax.grid(alpha=0.3, axis="y")
        ax1.set_ylabel("deliveries per s (thousands)")
        ax1.set_title("Fan-out throughput")
        ax2.set_yscale("log")
        ax2.set_ylabel("delivery latency p99, ms (log)")
        ax2.set_title("Fan-out latency")
        ax1.legend(fontsize=8)
        written.append(_save(fig, "fanout.png"))

    ttft = [r for r in records if r["scenario"] == "ttft" and r["ok"]]
    if ttft:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = ["fresh p50", "fresh p99", "keep-alive p50", "keep-alive p99"]
        paths = ["fresh_ms.p50", "fresh_ms.p99", "keepalive_ms.p50", "keepalive_ms.p99"]
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            rec = next((r for r in ttft if r["server"] == server), None)
            if rec:
                vals = [_get(rec["metrics"], p) or 0 for p in paths]
                ax.bar(
                    [j + i * width for j in range(4)],
                    vals,
                    width,
                    color=colors[server],
                    label=server,
                )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(4)], labels)
        ax.set_ylabel("request sent → first token, ms")
        ax.set_title("Time to first token added by the server")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        written.append(_save(fig, "ttft.png"))
    return written


def _variant_order(variant: str) -> tuple[float, list[tuple[int, int | str]]]:
    """'1k x4pub' -> (1000, [(1, 'x4pub')]): sizes in numeric order, then the words, the
    OpenAI clients in OPENAI_CLIENTS order ('50/s sdk' before '50/s fast')."""
    head, _, rest = variant.partition(" ")
    try:
        size = float(head.rstrip("k")) * (1000 if head.endswith("k") else 1)
    except ValueError:
        size = float("inf")
    words: list[tuple[int, int | str]] = [
        (0, OPENAI_CLIENTS.index(w)) if w in OPENAI_CLIENTS else (1, w) for w in rest.split()
    ]
    return size, words


def _save(fig: Any, name: str) -> Path:
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes (default)")
    mode.add_argument("--full", action="store_true", help="bigger counts, finer ramps")
    p.add_argument("--only", default=",".join(ALL_SCENARIOS), help="scenarios, comma-separated")
    p.add_argument("--servers", default=",".join(ALL_SERVERS), help="servers, comma-separated")
    p.add_argument(
        "--profile",
        action="store_true",
        help="record sseserver with py-spy during each load (bench/results/profile_*.txt); "
        "the records are marked profiled: sampling costs the server a little",
    )
    p.add_argument("--no-report", action="store_true", help="skip RESULTS.md and charts")
    p.add_argument(
        "--fanout-subscribers",
        default="",
        help="override the mode's fan-out sizes, e.g. 10000 or 1000,10000",
    )
    p.add_argument("--idle-streams", default="", help="override the mode's idle counts, e.g. 20000")
    p.add_argument(
        "--idle-kinds",
        default=",".join(IDLE_KINDS),
        help="what idle holds: generations (rows 'idle'), subscriptions (rows 'idle-sub'), "
        "or both (default)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run servers and load generator at this nice level (e.g. -5, as root) so that "
        "other programs on a shared machine disturb the measurements less",
    )
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in ALL_SCENARIOS]
    bad += [s for s in args.server_list if s not in SERVERS]
    args.idle_kind_list = tuple(k.strip() for k in args.idle_kinds.split(",") if k.strip())
    bad += [k for k in args.idle_kind_list if k not in IDLE_KINDS]
    if bad:
        p.error(f"unknown scenario or server: {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dataclasses.replace(FULL if args.full else QUICK)
    if args.fanout_subscribers:
        settings.fanout_subscribers = [int(x) for x in args.fanout_subscribers.split(",")]
        settings.redis_fanout_subscribers = list(settings.fanout_subscribers)
    if args.idle_streams:
        settings.idle_streams = [int(x) for x in args.idle_streams.split(",")]
    if args.nice:
        NICE[:] = ["nice", "-n", str(args.nice)]
    _raise_nofile()
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    bench = Bench(settings, run_id, profile=args.profile, idle_kinds=args.idle_kind_list)
    started = time.monotonic()
    for scenario in args.scenarios:
        for name in args.server_list:
            spec = SERVERS[name]
            if scenario not in spec.scenarios:
                continue
            why = spec.available()
            if why:
                bench.say(f"{name}: skipped ({why})")
                bench.record(scenario, "-", name, None, skipped=why)
                continue
            try:
                getattr(bench, scenario)(name)
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
                bench.say(f"{name} {scenario}: ERROR {exc}")
                bench.record(scenario, "-", name, None, error=str(exc)[:500])
    bench.say(f"done in {time.monotonic() - started:.0f} s")
    if not args.no_report:
        records = latest_records(settings.mode)
        charts = write_charts(records)
        report = write_report(records, settings)
        bench.say(f"wrote {report.relative_to(ROOT)} and {len(charts)} charts")
        summary = closing_note(records)
        if summary:
            print(summary, file=sys.stderr, flush=True)
    return 0


def closing_note(records: list[dict[str, Any]]) -> str:
    """The sseserver figures the core issue's closing note needs (and its Redis hub's)."""
    out = []
    for r in records:
        if r["server"] not in ("sseserver", "sseserver-redis") or not r["ok"]:
            continue
        m = r["metrics"]
        if r["server"] == "sseserver-redis":
            if r["scenario"] == "fanout":
                out.append(
                    f"sseserver-redis fanout {r['variant']}: {m['deliveries_per_s']:,.0f} "
                    f"deliveries/s, latency p50 {m['latency_ms'].get('p50')} ms / p99 "
                    f"{m['latency_ms'].get('p99')} ms, server / generator CPU "
                    f"{_util_text(m.get('cpu') or {'gen_util': 0})}"
                )
        elif r["scenario"] in ROW_KINDS:
            out.append(
                f"sseserver {row_name(r['scenario'], r['variant'])}: {m['held']:,} streams held, "
                f"{m['rss_per_stream_kb']:.2f} KB RSS per stream "
                f"(~{m.get('streams_per_gib') or 0:,} streams per GiB), "
                f"{m['opened_per_s']:,.0f} streams opened per s, {m['failures']} failures"
                + (f" [capped by {m['capped_by']}]" if m.get("capped_by") else "")
            )
        elif r["scenario"] == "tokens":
            out.append(
                f"sseserver tokens: {m['max_streams_held']:,} concurrent 50 token/s streams "
                f"held with p99 lateness {m['p99_ms_at_held']} ms (≤ {m['bound']:.0f} ms); "
                f"first failing count {m['failed_at']}"
            )
        elif r["scenario"] == "proxy" and "steps" in m:
            out.append(
                f"sseserver proxy {r['variant']}: {m['max_streams_held']:,} concurrent 50 "
                f"token/s streams through the OpenAI provider held with p99 lateness "
                f"{m['p99_ms_at_held']} ms; first failing count {m['failed_at']}; server "
                f"CPU {m['server_cpu_us_per_chunk']} µs per chunk "
                f"(at {m['server_cpu_us_per_chunk_at']} streams)"
            )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

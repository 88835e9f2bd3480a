"""The servers a run compares (one registry line each), and the processes of a run:
a server pinned to its core, the private redis-server of sseserver-redis, fake upstreams
(OpenAI and Gemini, the tests' Python fakes or the bench's fast Node ones)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import (
    LOADGEN_CORE,
    NCHAN_MODULE,
    NGINX,
    NODE,
    PEERS,
    PY,
    REDIS_SERVER,
    ROOT,
    SERVER_CORE,
    children,
    free_port,
    http_get,
    peek_stream,
    pid_alive,
    pinned,
    raise_nofile_in_child,
)
from bench.load.addressing import sub_target
from bench.settings import ALL_SCENARIOS, DEFAULT_SCENARIOS
from tests.support import redis_server


@dataclasses.dataclass
class ServerSpec:
    name: str
    flavor: str  # how the load generator addresses it (see bench.load.addressing.FLAVORS)
    scenarios: tuple[str, ...]
    argv: Callable[[int, Path], list[str]]
    available: Callable[[], str | None] = lambda: None  # None, or why it cannot run
    version: Callable[[], str] = lambda: ""
    redis: bool = False  # runs against a private redis-server (RedisServer), --hub URL
    # a relay only (no /v1/stream, no pub/sub): warmed up by its scenario, not by Server
    relay_only: bool = False


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
    # Not an SSE server: the relay peer of the proxy scenario (POST /v1/chat/completions
    # passed through aiohttp's client to the fake OpenAI upstream), its rows only.
    "aiohttp-relay": ServerSpec(
        "aiohttp-relay",
        "peer",
        ("proxy",),
        lambda port, tmp: [PY, str(PEERS / "aiohttp_relay.py"), "--port", str(port)],
        available=_python_peer("aiohttp", "aiohttp", "uvloop"),
        version=lambda: f"aiohttp {_pkg_version('aiohttp')} (server and client)",
        relay_only=True,
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

ALL_SERVERS = tuple(SERVERS)


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
        argv = [*pinned(SERVER_CORE), *spec.argv(self.port, self.tmp)]
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
            preexec_fn=raise_nofile_in_child,
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
        if self.spec.relay_only:
            return
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


class RedisServer(redis_server.RedisServer):
    """The tests' redis-server for sseserver-redis: a free loopback port, no persistence,
    pinned to the load generator's core (its CPU is measured there as ``redis_util`` and
    not counted as noise); stopped by its PID, its folder removed."""

    def __init__(self) -> None:
        super().__init__(
            REDIS_SERVER,
            Path(tempfile.mkdtemp(prefix="bench-redis-")),
            free_port(),
            prefix=pinned(LOADGEN_CORE),
            preexec_fn=raise_nofile_in_child,
        )
        self.start()

    @property
    def url(self) -> str:
        return f"{super().url}/0"

    def log_tail(self, n: int = 800) -> str:
        return self.log()[-n:].strip()

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.folder, ignore_errors=True)


UPSTREAMS = {
    # the fakes of the tests: record connections (/_fake/stats), every failure mode; slow
    ("openai", "python"): [PY, "-m", "tests.upstreams.openai_wire"],
    ("gemini", "python"): [PY, "-m", "tests.upstreams.gemini_wire"],
    # bench/peers/*_upstream.js: same wire formats and token texts, streams only; fast
    ("openai", "node"): [NODE, str(PEERS / "openai_upstream.js")],
    ("gemini", "node"): [NODE, str(PEERS / "gemini_upstream.js")],
}


class Upstream:
    """A fake upstream of ``api`` (``openai``, ``gemini``) in its own process, pinned to the
    load generator's core (the proxy loads are sequential): ``python``, the fake of the
    tests (tests/upstreams/{api}_wire.py), or ``node`` (bench/peers/{api}_upstream.js)."""

    def __init__(self, kind: str = "python", timeout_s: float = 15.0, api: str = "openai") -> None:
        self.kind = kind
        self.api = api
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*pinned(LOADGEN_CORE), *UPSTREAMS[api, kind], "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile_in_child,
        )
        self.pid = self.proc.pid  # taskset execs the upstream: same PID
        line = self._first_line(timeout_s)
        if not line.startswith("LISTENING"):
            self.stop()
            raise RuntimeError(f"fake {api} upstream ({kind}) did not start: {line.strip()!r}")

    @property
    def base_url(self) -> str:
        """What sseserver's --openai-base-url / --gemini-base-url (and the relay peer's
        --upstream) take."""
        url = f"http://127.0.0.1:{self.port}"
        return f"{url}/v1" if self.api == "openai" else f"{url}/"

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

"""A real nginx for integration tests: a config written into a temporary folder, nginx
started in the foreground on a free loopback port, and stopped by its PID.

Everything nginx writes (pid file, temp folders, logs) stays inside that folder, so it
runs the same as root (workers keep root's identity: a pytest tmp folder is not
reachable by ``nobody``) or as an ordinary user.

Usage::

    with nginx_running(tmp_path, lambda port: bare_proxy_config(port, upstream)) as nx:
        ... connect to 127.0.0.1:nx.port ...
    nx.log()   # nginx's stderr (its error log) so far
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.procfs import alive
from tests.support.procs import ROOT, free_port, wait_for_port
from tests.support.requirements import require_binary

DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"

TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

MAIN_TEMPLATE = """\
# Written by tests/support/nginx.py. daemon, pid and error_log come from -g.
worker_processes 1;
{user}
events {{
    worker_connections 1024;
}}

http {{
    access_log {access_log};
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;

{http}
}}
"""


def bare_proxy_config(listen_port: int, upstream_port: int) -> str:
    """nginx's defaults: one ``proxy_pass`` and nothing else (HTTP/1.0 to the upstream
    with ``Connection: close``, proxy_buffering on)."""
    return f"""\
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
        }}
    }}
"""


def deploy_config(
    listen_port: int, upstream_port: int, log_dir: Path, path: Path = DEPLOY_CONF
) -> str:
    """``deploy/nginx.conf`` as shipped, with its upstream address, listen address and
    log folder rewritten for the test. Raises AssertionError if the file no longer has
    the lines the rewrite expects (so a drift is loud, never silently untested)."""
    text = path.read_text()
    rewrites = (
        (r"(?m)^(\s*server\s+)127\.0\.0\.1:8000\b", rf"\g<1>127.0.0.1:{upstream_port}"),
        (r"(?m)^(\s*listen\s+)80\s*;", rf"\g<1>127.0.0.1:{listen_port};"),
    )
    for pattern, replacement in rewrites:
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"{path}: expected exactly one match of {pattern!r}, got {count}"
    assert "/var/log/nginx/" in text, f"{path}: no log path under /var/log/nginx/"
    text = text.replace("/var/log/nginx/", f"{log_dir}/")
    return text


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path
    conf: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """nginx's error log (its stderr) so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def workers(self) -> list[int]:
        """PIDs of the master's children (the worker processes)."""
        try:
            tasks = Path(f"/proc/{self.pid}/task")
            pids: list[int] = []
            for task in tasks.iterdir():
                children = (task / "children").read_text().split()
                pids.extend(int(p) for p in children)
            return pids
        except OSError:
            return []

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGTERM to the master, by PID); SIGKILL for whatever is left."""
        if self.proc.poll() is not None:
            return
        workers = self.workers()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # A worker outlives a SIGKILLed master; make sure none is left behind.
        deadline = time.monotonic() + 2.0
        for pid in workers:
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.02)
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def write_config(prefix: Path, http: str, *, access_log: str | None = None) -> Path:
    """Write a complete nginx.conf into ``prefix`` around ``http`` (http{} context).
    ``access_log``: a file name inside ``prefix``, or None for ``access_log off``."""
    prefix.mkdir(parents=True, exist_ok=True)
    for name in TEMP_DIRS:
        (prefix / name).mkdir(exist_ok=True)
    (prefix / "logs").mkdir(exist_ok=True)  # nginx -p expects it for relative paths
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        MAIN_TEMPLATE.format(
            user=user,
            prefix=prefix,
            access_log=f"{prefix / access_log}" if access_log else "off",
            http=http,
        )
    )
    return conf


def check_config(conf: Path, prefix: Path) -> None:
    """``nginx -t`` on ``conf``; AssertionError with nginx's message when it is invalid."""
    binary = require_binary("nginx")
    result = subprocess.run(
        [
            binary,
            "-t",
            "-q",
            "-e",
            "stderr",
            "-p",
            f"{prefix}/",
            "-c",
            str(conf),
            "-g",
            f"pid {prefix}/nginx-test.pid; error_log stderr;",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, f"nginx -t failed:\n{result.stderr}\n--- {conf}:\n" + (
        conf.read_text()
    )


@contextmanager
def nginx_running(
    prefix: Path,
    make_http: Callable[[int], str],
    *,
    access_log: str | None = None,
    attempts: int = 3,
) -> Iterator[Nginx]:
    """Start nginx (foreground, ``daemon off``) on a free loopback port, with
    ``make_http(port)`` as its http{} body; stop it (by PID) on exit.

    A callable rather than a string, so that a retry after losing the free-port race
    (another process took the port first) can rewrite the listen port.
    """
    binary = require_binary("nginx")
    last_error = ""
    for _ in range(attempts):
        listen = free_port()
        conf = write_config(prefix, make_http(listen), access_log=access_log)
        check_config(conf, prefix)
        stderr_path = prefix / "nginx.stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [
                    binary,
                    "-e",
                    "stderr",
                    "-p",
                    f"{prefix}/",
                    "-c",
                    str(conf),
                    "-g",
                    f"daemon off; pid {prefix}/nginx.pid; error_log stderr;",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        nx = Nginx(proc, listen, prefix, conf, stderr_path)
        try:
            wait_for_port(listen, timeout=10, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            nx.stop()
            last_error = f"{exc}\n{nx.log()}"
            if "Address already in use" in last_error:
                continue
            raise RuntimeError(f"nginx did not start: {last_error}") from None
        try:
            yield nx
        finally:
            nx.stop()
        return
    raise RuntimeError(f"nginx did not start after {attempts} attempts: {last_error}")

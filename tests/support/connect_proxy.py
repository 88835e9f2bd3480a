"""A small HTTP proxy on loopback, for tests of clients configured with ``HTTPS_PROXY`` /
``HTTP_PROXY``: it tunnels ``CONNECT host:port`` (what a client does for an ``https://``
URL through a proxy) and forwards absolute-form plain-HTTP requests (``POST
http://127.0.0.1:PORT/path HTTP/1.1``), and records each, so that a test can show the
traffic did (or did not) go through it.

Targets on loopback only (127.0.0.0/8, ::1, ``localhost``): anything else is refused with
403, so no test can reach the network through it. With ``--require-auth user:pass`` every
request must carry ``Proxy-Authorization: Basic`` with those credentials (407 otherwise),
so a test can show that credentials in a proxy URL are sent.

Each record (``GET /_proxy/stats``, JSON, an origin-form request to the proxy itself):
``method`` (``CONNECT`` or ``forward``), ``target`` (``host:port``), ``status`` (200 when
relayed; 403, 407 or 502 when refused), ``authorized`` (credentials given and right),
``bytes_to_target`` / ``bytes_to_client`` (relayed each way: for a tunnel, what follows its
``200``, i.e. the TLS bytes; for a forward, the rewritten request too), ``opened_at`` /
``closed_at`` (``time.monotonic()``, one clock for every process of the machine, as the fake
upstreams use).

Deliberate simplifications:
- A forwarded request gets ``Connection: close`` and its connection carries that one
  request: the origin answers and closes, and so the client, told ``Connection: close``
  by the origin's answer, does not send another request in absolute form on it (the
  ``Connection`` header is hop-by-hop, RFC 9110 §7.6.1, so a proxy may choose this).
- Relaying is byte for byte in both directions; when one side closes (or fails), the
  other is closed too: a half-closed tunnel is of no use to an HTTP client.

Run: ``python -m tests.support.connect_proxy --port 0 [--require-auth user:pass]`` prints
``LISTENING http://127.0.0.1:PORT`` and serves until SIGTERM/SIGINT; ``start_proxy()``
does that in a subprocess, ``ProxyProcess.stop()`` ends it by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import ipaddress
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tests.support.procs import ROOT, stop_process, wait_listening

START_TIMEOUT_S = 10.0
STATS_PATH = "/_proxy/stats"
HEAD_LIMIT = 64 * 1024  # bytes of a request head; a client sending more is refused (431)
READ_SIZE = 65536
CONNECT_TIMEOUT_S = 5.0  # to open the connection to a target on loopback

# The variables that send an HTTP client through a proxy (urllib, httpx, requests and curl
# read each in any letter case: urllib matches every name that ends in ``_proxy``).
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")

# Request headers meant for the proxy, never passed to the origin (RFC 9110 §7.6.1, and
# ``Proxy-Connection``, which old clients send instead of ``Connection``).
_HOP_BY_HOP = frozenset({b"connection", b"proxy-connection", b"proxy-authorization", b"keep-alive"})

# What ends a relay besides a clean EOF: the peer reset the connection or it is gone.
RELAY_ERRORS = (ConnectionError, OSError)


def is_proxy_variable(name: str) -> bool:
    """True for ``HTTPS_PROXY``, ``no_proxy``, ``Https_Proxy``...: every variable that some
    client reads as proxy configuration."""
    return name.lower().endswith("_proxy")


@dataclass(slots=True)
class Tunnel:
    """One CONNECT tunnel or one forwarded request, as the proxy handled it."""

    id: int
    method: str  # "CONNECT" or "forward"
    target: str  # host:port
    opened_at: float
    status: int = 0  # 200 when relayed, else the refusal's status
    authorized: bool = False  # Proxy-Authorization present and right
    bytes_to_target: int = 0
    bytes_to_client: int = 0
    closed_at: float | None = None


class ProxyRefused(Exception):
    """A request the proxy answers itself, with ``status``."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


class ConnectProxy:
    """The proxy server; ``tunnels`` holds every record, in the order requests came."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, require_auth: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.require_auth = require_auth  # "user:pass"
        self.tunnels: list[Tunnel] = []
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> ConnectProxy:
        self._server = await asyncio.start_server(
            self._on_client, self.host, self.port, limit=HEAD_LIMIT, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and end every relay."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ConnectProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def stats(self) -> dict[str, Any]:
        return {"now": time.monotonic(), "tunnels": [dataclasses.asdict(t) for t in self.tunnels]}

    # -- one client connection ---------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except RELAY_ERRORS:
            pass  # the client went away before or while it was served
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return  # closed before a whole head
        except asyncio.LimitOverrunError:
            await _answer(writer, 431, "Request Header Fields Too Large")
            return
        lines = head[:-4].split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            await _answer(writer, 400, "Bad Request")
            return
        headers = [_header(line) for line in lines[1:]]
        if method == "CONNECT":
            tunnel = self._record("CONNECT", target)
            await self._relay(tunnel, headers, reader, writer, first=None)
        elif target.startswith("http://"):
            url = urlsplit(target)
            tunnel = self._record("forward", f"{url.hostname}:{url.port or 80}")
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            kept = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
            first = b"".join(
                [
                    f"{method} {path} {version}\r\n".encode("latin-1"),
                    *(k + b": " + v + b"\r\n" for k, v in kept),
                    b"Connection: close\r\n\r\n",
                ]
            )
            await self._relay(tunnel, headers, reader, writer, first=first)
        elif method == "GET" and target == STATS_PATH:
            body = json.dumps(self.stats()).encode()
            await _answer(writer, 200, "OK", body, {"Content-Type": "application/json"})
        else:
            await _answer(writer, 400, "Bad Request")

    def _record(self, method: str, target: str) -> Tunnel:
        tunnel = Tunnel(next(self._ids), method, target, opened_at=time.monotonic())
        self.tunnels.append(tunnel)
        return tunnel

    async def _relay(
        self,
        tunnel: Tunnel,
        headers: list[tuple[bytes, bytes]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes | None,
    ) -> None:
        """Open the target and relay; ``first`` is the forwarded request head, or None
        for a tunnel (which is answered 200 first)."""
        try:
            try:
                tunnel.authorized = self._authorized(headers)
                host, port = _loopback_target(tunnel.target)
                try:
                    upstream_reader, upstream_writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                    )
                except (OSError, TimeoutError) as exc:
                    raise ProxyRefused(502, "Bad Gateway") from exc
            except ProxyRefused as refused:
                tunnel.status = refused.status
                await _answer(writer, refused.status, refused.reason, headers=refused.headers)
                return
            tunnel.status = 200
            if first is None:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream_writer.write(first)
                tunnel.bytes_to_target += len(first)
            try:
                await _pipe_both(tunnel, reader, writer, upstream_reader, upstream_writer)
            finally:
                upstream_writer.close()
        finally:
            tunnel.closed_at = time.monotonic()

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the right credentials were sent; raises 407 when they are required
        and were not."""
        given = [v for k, v in headers if k.lower() == b"proxy-authorization"]
        ok = False
        if self.require_auth is not None and given:
            scheme, _, encoded = given[0].decode("latin-1").partition(" ")
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = None
            ok = scheme.lower() == "basic" and decoded == self.require_auth
        if self.require_auth is not None and not ok:
            raise ProxyRefused(
                407,
                "Proxy Authentication Required",
                {"Proxy-Authenticate": 'Basic realm="connect_proxy"'},
            )
        return ok


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip(), value.strip()


def _loopback_target(target: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` when the host is on loopback; else 403 (or 400)."""
    host, sep, port_text = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ProxyRefused(400, "Bad Request")
    if host.lower() != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name other than localhost: never resolved, never reached
        if not loopback:
            raise ProxyRefused(403, "Forbidden")
    return host, int(port_text)


async def _answer(
    writer: asyncio.StreamWriter,
    status: int,
    reason: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> None:
    """A complete response from the proxy itself; the connection then closes."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    writer.write("\r\n".join(lines).encode("latin-1") + body)
    await writer.drain()


async def _pipe_both(
    tunnel: Tunnel,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    """Relay until either side closes, then close the other one."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, field_name: str) -> None:
        try:
            while data := await src.read(READ_SIZE):
                dst.write(data)
                setattr(tunnel, field_name, getattr(tunnel, field_name) + len(data))
                await dst.drain()
        except RELAY_ERRORS:
            pass  # a reset is an end like any other
        finally:
            dst.close()

    # Leftover bytes a client sent right after its head are in client_reader's buffer and
    # are relayed first, in order.
    up = asyncio.ensure_future(pipe(client_reader, upstream_writer, "bytes_to_target"))
    down = asyncio.ensure_future(pipe(upstream_reader, client_writer, "bytes_to_client"))
    try:
        # Each pipe closes the side it writes to when its source ends; the other pipe then
        # reads EOF from that closed side, so both end.
        await asyncio.gather(up, down)
    finally:
        up.cancel()
        down.cancel()


# -- as a process ------------------------------------------------------------------------


@dataclass
class ProxyProcess:
    """``python -m tests.support.connect_proxy`` running in a subprocess."""

    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT
    require_auth: str | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def url_with_auth(self, credentials: str | None = None) -> str:
        """The proxy URL with ``user:pass@`` (the required ones by default)."""
        creds = credentials or self.require_auth
        assert creds is not None, "no credentials to put in the URL"
        return self.url.replace("://", f"://{creds}@", 1)

    def stop(self) -> None:
        stop_process(self.proc, within_s=10)


def start_proxy(require_auth: str | None = None) -> ProxyProcess:
    """Start the proxy on a free loopback port and wait (bounded) until it listens."""
    auth = [] if require_auth is None else ["--require-auth", require_auth]
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "tests.support.connect_proxy", "--port", "0", *auth],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    return ProxyProcess(proc, wait_listening(proc, "connect proxy", START_TIMEOUT_S), require_auth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.support.connect_proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--require-auth", default=None, metavar="USER:PASS")
    args = parser.parse_args(argv)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        proxy = ConnectProxy(host=args.host, port=args.port, require_auth=args.require_auth)
        async with proxy:
            print(f"LISTENING {proxy.url}", flush=True)
            await stop.wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

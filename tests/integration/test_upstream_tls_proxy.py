"""Upstreams over TLS and through proxies, end to end (SPEC §7): a real sseserver process,
each client of each provider inside it, fake upstreams that speak the real streaming wire
formats over HTTPS (a certificate of a test CA, ``tests.support.tls``) or plain HTTP, and a
local proxy that tunnels ``CONNECT`` and forwards plain requests
(``tests.support.connect_proxy``), recording what went through it.

What users rely on the SDKs for, and so what every client must do:
- ``SSL_CERT_FILE`` names the CAs to trust, and certificates are verified: an upstream
  whose certificate no trusted CA signed is one ``event: error`` and a clean end, at once;
- ``HTTPS_PROXY`` sends ``https://`` calls through a ``CONNECT`` tunnel, ``HTTP_PROXY``
  sends ``http://`` calls to the proxy in absolute form, ``NO_PROXY`` bypasses both, and
  ``user:pass@`` in the proxy URL becomes ``Proxy-Authorization``.

The server's environment is controlled: it starts without any proxy variable (in any letter
case) or CA variable of this machine's, and gets only those the test sets.

Plain HTTP without a proxy is tests/integration/test_providers_e2e.py's subject.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from sseserver.providers import CLIENTS
from tests.support.connect_proxy import ProxyProcess, is_proxy_variable, start_proxy
from tests.support.rawhttp import open_stream, text_of
from tests.support.redis_server import ServerProcess, sseserver_running
from tests.support.sse_parser import Event
from tests.support.tls import TRUST_VARIABLES, TLSFiles
from tests.support.upstream_procs import UpstreamProcess, start_upstream
from tests.upstreams import expected_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PROVIDERS = ("openai", "gemini")
UPSTREAM_TIMEOUT_S = 5.0  # a failure that waited for it would be a hang, not a refusal
TOKENS = 4
DONE = "[DONE]"
PROXY_CREDENTIALS = "tester:s3cret"


def provider_clients() -> list[tuple[str, str | None]]:
    """(provider, client) for every client ``CLIENTS`` registers, so that a new client is
    tested here as soon as it is registered; None (the default) for a provider without
    any registered."""
    return [
        (provider, client)
        for provider in PROVIDERS
        for client in (sorted(CLIENTS[provider]) if CLIENTS.get(provider) else [None])
    ]


CASES = provider_clients()
CASE_IDS = [f"{p}-{c or 'default'}" for p, c in CASES]


# -- processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstreams(tls_files: TLSFiles) -> Iterator[dict[tuple[str, str], UpstreamProcess]]:
    """One fake per API and scheme: ``(api, "https")`` serves the test CA's certificate."""
    started: dict[tuple[str, str], UpstreamProcess] = {}
    try:
        for api in PROVIDERS:
            started[api, "https"] = start_upstream(api, tls=tls_files)
            started[api, "http"] = start_upstream(api)
        yield started
    finally:
        for up in started.values():
            up.stop()


@pytest.fixture
def proxy() -> Iterator[ProxyProcess]:
    """A fresh proxy per test, so that its records are this test's alone."""
    running = start_proxy()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def auth_proxy() -> Iterator[ProxyProcess]:
    """A proxy that answers 407 without ``Proxy-Authorization: Basic`` of
    ``PROXY_CREDENTIALS``."""
    running = start_proxy(require_auth=PROXY_CREDENTIALS)
    try:
        yield running
    finally:
        running.stop()


def server_environ(**variables: str) -> dict[str, str]:
    """This process's environment less every proxy and CA variable, plus ``variables``."""
    env = {
        k: v for k, v in os.environ.items() if not is_proxy_variable(k) and k not in TRUST_VARIABLES
    }
    env.update(variables)
    return env


@contextmanager
def sseserver_for(
    folder: Path, provider: str, client: str | None, up: UpstreamProcess, env: dict[str, str]
) -> Iterator[ServerProcess]:
    """sseserver with ``provider`` pointed at ``up``, using ``client`` (the flag is
    ``--{provider}-client``, as ``--openai-client``); one that does not start fails the
    test with its log."""
    args = [f"--{provider}-base-url", up.base_url, "--upstream-timeout-s", str(UPSTREAM_TIMEOUT_S)]
    if client is not None:
        args += [f"--{provider}-client", client]
    name = f"{provider}-{client or 'default'}"
    with ExitStack() as stack:
        try:
            server = stack.enter_context(sseserver_running(folder, *args, name=name, environ=env))
        except RuntimeError as exc:
            logs = "".join(p.read_text(errors="replace") for p in folder.glob(f"{name}-*.log"))
            raise AssertionError(f"sseserver {' '.join(args)}: {exc}\n{logs[-2000:]}") from exc
        yield server


# -- records -------------------------------------------------------------------------------


async def fake_requests(up: UpstreamProcess, nonce: str) -> list[dict[str, Any]]:
    """The requests the fake received whose body carries ``nonce``."""
    async with httpx.AsyncClient(verify=up.verify(), trust_env=False, timeout=5.0) as http:
        stats = (await http.get(f"{up.url}/_fake/stats")).json()
    return [r for r in stats["requests"] if nonce in r["body"]]


async def proxy_tunnels(proxy: ProxyProcess) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
        tunnels: list[dict[str, Any]] = (await http.get(f"{proxy.url}/_proxy/stats")).json()[
            "tunnels"
        ]
    return tunnels


# -- the client side -----------------------------------------------------------------------


async def stream(server: ServerProcess, provider: str, prompt: str) -> list[Event]:
    """Every event of ``GET /v1/stream``; the body must end (chunked terminator)."""
    target = "/v1/stream?" + urlencode({"provider": provider, "q": prompt})
    client, resp, reader = await open_stream(server.port, target)
    async with client:
        assert resp.status == 200, (resp, server.log()[-3000:])
        events = await reader.rest(within=UPSTREAM_TIMEOUT_S + 5)
    assert reader.ended
    return events


async def assert_streams(server: ServerProcess, provider: str, up: UpstreamProcess) -> None:
    """A whole answer arrives (start, every token, metrics, [DONE]; no error), and the fake
    upstream received the request that carried it."""
    nonce = "n" + secrets.token_hex(6)
    events = await stream(server, provider, f"{nonce} [fake tokens={TOKENS}]")
    types = [e.type for e in events]
    assert types == ["start", *["message"] * TOKENS, "metrics", "message"], (
        [(e.type, e.data) for e in events],
        server.log()[-3000:],
    )
    assert text_of(events[1 : 1 + TOKENS]) == expected_text(TOKENS)
    assert events[-1].data == DONE
    assert json.loads(events[-2].data)["tokens"] == TOKENS
    assert len(await fake_requests(up, nonce)) == 1


async def assert_refused_at_once(
    server: ServerProcess, provider: str, up: UpstreamProcess
) -> dict[str, Any]:
    """One ``event: error`` (a connection error, retryable) and a clean end, well before the
    upstream timeout; the request never reached the fake; the server still serves."""
    nonce = "n" + secrets.token_hex(6)
    t0 = time.monotonic()
    events = await stream(server, provider, f"{nonce} [fake tokens={TOKENS}]")
    took = time.monotonic() - t0
    assert [e.type for e in events] == ["start", "error", "metrics", "message"], events
    assert events[-1].data == DONE
    error: dict[str, Any] = json.loads(events[1].data)
    assert error["code"] == "upstream_connection_error", error
    assert error["retryable"] is True, error
    assert took < UPSTREAM_TIMEOUT_S, f"{took:.2f} s: waited for the timeout"
    assert await fake_requests(up, nonce) == []
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
        assert (await http.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200
    assert server.proc.poll() is None
    return error


# -- TLS, directly ---------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "client"), CASES, ids=CASE_IDS)
async def test_tls_upstream_trusted_through_ssl_cert_file(
    provider: str,
    client: str | None,
    upstreams: dict[tuple[str, str], UpstreamProcess],
    tls_files: TLSFiles,
    tmp_path: Path,
) -> None:
    up = upstreams[provider, "https"]
    env = server_environ(SSL_CERT_FILE=str(tls_files.ca))
    with sseserver_for(tmp_path, provider, client, up, env) as server:
        await assert_streams(server, provider, up)


@pytest.mark.parametrize(("provider", "client"), CASES, ids=CASE_IDS)
async def test_tls_upstream_with_untrusted_certificate_is_one_error(
    provider: str,
    client: str | None,
    upstreams: dict[tuple[str, str], UpstreamProcess],
    tmp_path: Path,
) -> None:
    """Without the test CA among the trusted ones, the certificate does not verify: the
    call fails at the handshake (no request is sent), it is not retried until a timeout,
    and the server goes on serving."""
    up = upstreams[provider, "https"]
    with sseserver_for(tmp_path, provider, client, up, server_environ()) as server:
        await assert_refused_at_once(server, provider, up)
        await assert_refused_at_once(server, provider, up)  # and again: nothing was left stuck


# -- through a proxy -------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "client"), CASES, ids=CASE_IDS)
async def test_tls_upstream_through_connect_proxy(
    provider: str,
    client: str | None,
    upstreams: dict[tuple[str, str], UpstreamProcess],
    tls_files: TLSFiles,
    proxy: ProxyProcess,
    tmp_path: Path,
) -> None:
    up = upstreams[provider, "https"]
    env = server_environ(SSL_CERT_FILE=str(tls_files.ca), HTTPS_PROXY=proxy.url)
    with sseserver_for(tmp_path, provider, client, up, env) as server:
        await assert_streams(server, provider, up)
    tunnels = await proxy_tunnels(proxy)
    assert tunnels, "nothing went through the proxy"
    for tunnel in tunnels:  # every upstream call went through a CONNECT tunnel to the fake
        assert (tunnel["method"], tunnel["target"], tunnel["status"]) == (
            "CONNECT",
            f"127.0.0.1:{up.port}",
            200,
        ), tunnel
    # TLS went both ways inside the tunnel (a handshake and an answer of several events).
    assert sum(t["bytes_to_target"] for t in tunnels) > 0
    assert sum(t["bytes_to_client"] for t in tunnels) > 1000


@pytest.mark.parametrize(("provider", "client"), CASES, ids=CASE_IDS)
async def test_plain_upstream_through_http_proxy(
    provider: str,
    client: str | None,
    upstreams: dict[tuple[str, str], UpstreamProcess],
    proxy: ProxyProcess,
    tmp_path: Path,
) -> None:
    up = upstreams[provider, "http"]
    env = server_environ(HTTP_PROXY=proxy.url)
    with sseserver_for(tmp_path, provider, client, up, env) as server:
        await assert_streams(server, provider, up)
    tunnels = await proxy_tunnels(proxy)
    assert tunnels, "nothing went through the proxy"
    for tunnel in tunnels:  # absolute-form requests, forwarded to the fake
        assert (tunnel["method"], tunnel["target"], tunnel["status"]) == (
            "forward",
            f"127.0.0.1:{up.port}",
            200,
        ), tunnel
    assert sum(t["bytes_to_client"] for t in tunnels) > 0


@pytest.mark.parametrize(("provider", "client"), CASES, ids=CASE_IDS)
async def test_no_proxy_bypasses_the_proxy(
    provider: str,
    client: str | None,
    upstreams: dict[tuple[str, str], UpstreamProcess],
    tls_files: TLSFiles,
    proxy: ProxyProcess,
    tmp_path: Path,
) -> None:
    up = upstreams[provider, "https"]
    env = server_environ(
        SSL_CERT_FILE=str(tls_files.ca),
        HTTPS_PROXY=proxy.url,
        HTTP_PROXY=proxy.url,
        NO_PROXY="127.0.0.1",
    )
    with sseserver_for(tmp_path, provider, client, up, env) as server:
        await assert_streams(server, provider, up)
    assert await proxy_tunnels(proxy) == []


@pytest.mark.parametrize(("provider", "client"), CASES, ids=CASE_IDS)
async def test_proxy_credentials_in_the_url_are_sent(
    provider: str,
    client: str | None,
    upstreams: dict[tuple[str, str], UpstreamProcess],
    tls_files: TLSFiles,
    auth_proxy: ProxyProcess,
    tmp_path: Path,
) -> None:
    up = upstreams[provider, "https"]
    env = server_environ(SSL_CERT_FILE=str(tls_files.ca), HTTPS_PROXY=auth_proxy.url_with_auth())
    with sseserver_for(tmp_path, provider, client, up, env) as server:
        await assert_streams(server, provider, up)
    tunnels = await proxy_tunnels(auth_proxy)
    assert tunnels
    for tunnel in tunnels:  # the first CONNECT already carried them: no 407 on the way
        assert (tunnel["method"], tunnel["status"], tunnel["authorized"]) == (
            "CONNECT",
            200,
            True,
        ), tunnel


@pytest.mark.parametrize(("provider", "client"), CASES, ids=CASE_IDS)
async def test_proxy_refusing_the_credentials_is_one_error(
    provider: str,
    client: str | None,
    upstreams: dict[tuple[str, str], UpstreamProcess],
    tls_files: TLSFiles,
    auth_proxy: ProxyProcess,
    tmp_path: Path,
) -> None:
    """The other side of the test above: the proxy does check (407 without credentials),
    and a 407 to CONNECT is a failed connection, reported at once."""
    up = upstreams[provider, "https"]
    env = server_environ(SSL_CERT_FILE=str(tls_files.ca), HTTPS_PROXY=auth_proxy.url)
    with sseserver_for(tmp_path, provider, client, up, env) as server:
        await assert_refused_at_once(server, provider, up)
    tunnels = await proxy_tunnels(auth_proxy)
    assert tunnels
    assert {(t["method"], t["status"]) for t in tunnels} == {("CONNECT", 407)}, tunnels

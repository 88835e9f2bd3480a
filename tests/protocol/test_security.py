"""Security over real loopback sockets (SPEC §9): JWT (HS256, RS256, ES256) from a header,
either cookie or the query; 401/403 answers; the public health paths; a token that expires
mid-stream; rate limits per subject and per client IP (X-Forwarded-For only from trusted
proxies); concurrent-stream caps; the CORS allowlist; the start-up warning when auth is off."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sseserver.config import parse_rate
from tests.support.jwt_keys import b64url, bearer, public_pem
from tests.support.oracle import Client, fetch
from tests.support.procs import server_process
from tests.support.rawhttp import Response
from tests.support.servers import running_server
from tests.support.sse_parser import Event
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(60)

SECRET = "protocol-test-secret-long-enough-for-hs256!"
STREAM = "/v1/stream?tokens=2&interval_ms=0"
LONG_STREAM = "/v1/stream?tokens=100000&interval_ms=20"
LIMITED = "/v1/streams/no-such-generation"  # authenticated and limited; 404 when allowed
WWW_AUTH = 'Bearer realm="sseserver"'


def assert_error(resp: Response, status: int, code: str | None = None) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert (resp.header("content-type") or "").startswith("application/json")
    assert len(resp.body) < 2048
    error = resp.json()["error"]
    if code is not None:
        assert error["code"] == code, error


def assert_401(resp: Response) -> None:
    assert_error(resp, 401)
    assert resp.header("www-authenticate") == WWW_AUTH


# --------------------------------------------------------------------------------------
# Tokens and keys
# --------------------------------------------------------------------------------------


def hs256(claims: dict[str, Any] | None = None, secret: str = SECRET) -> str:
    return jwt.encode({"sub": "alice", **(claims or {})}, secret, algorithm="HS256")


def handmade(alg: str, claims: dict[str, Any], key: bytes | None = None) -> str:
    """A token PyJWT would refuse to make: alg none, or HS256 keyed with a PEM."""
    signing = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "."
    signing += b64url(json.dumps(claims).encode())
    if key is None:
        return signing + "."
    return signing + "." + b64url(hmac.new(key, signing.encode(), hashlib.sha256).digest())


async def assert_streams(port: int, target: str, headers: Iterable[tuple[str, str]]) -> None:
    async with await Client.open(port) as client:
        client.send("GET", target, headers)
        resp = await client.head()
        assert resp.status == 200, resp.status
        assert (resp.header("content-type") or "").startswith("text/event-stream")
        events = await client.rest()
        assert events[0].type == "start"
        assert events[-1].data == "[DONE]"


# --------------------------------------------------------------------------------------
# JWT: where the token comes from
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "cookie", "mercure_cookie", "query"])
async def test_hs256_token_from_each_place(where: str) -> None:
    token = hs256()
    target, headers = STREAM, []
    if where == "header":
        headers = bearer(token)
    elif where == "cookie":
        headers = [("Cookie", f"theme=dark; sseserver_token={token}")]
    elif where == "mercure_cookie":
        headers = [("Cookie", f"mercureAuthorization={token}")]
    else:
        target = f"{STREAM}&access_token={quote(token)}"
    async with running_server(jwt_secret=SECRET) as server:
        await assert_streams(server.port, target, headers)


async def test_missing_token_401_with_www_authenticate() -> None:
    async with running_server(jwt_secret=SECRET) as server:
        for target, method in [
            (STREAM, "GET"),
            (LIMITED, "GET"),
            ("/.well-known/mercure?topic=a", "GET"),
        ]:
            resp = await fetch(server.port, target, method=method)
            assert_401(resp)
            assert resp.json()["error"]["code"] == "unauthorized"
        resp = await fetch(
            server.port,
            "/v1/chat/completions",
            [("Content-Type", "application/json")],
            method="POST",
            body=b'{"messages":[{"role":"user","content":"hi"}]}',
        )
        assert_401(resp)


@pytest.mark.parametrize("key_form", ["pem", "path"])
@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_public_key_tokens(
    alg: str,
    key_form: str,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    key: Any = rsa_key if alg == "RS256" else ec_key
    pem = public_pem(key)
    if key_form == "path":
        path = tmp_path / "public.pem"
        path.write_text(pem)
        pem = str(path)
    token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, key, algorithm=alg)
    async with running_server(jwt_public_key=pem) as server:
        await assert_streams(server.port, STREAM, bearer(token))
        assert_401(await fetch(server.port, STREAM))


# --------------------------------------------------------------------------------------
# JWT: refusals
# --------------------------------------------------------------------------------------

NOW = int(time.time())


def _bad_hs256_tokens() -> list[tuple[str, str]]:
    now = int(time.time())
    return [
        ("garbage", "not.a.jwt"),
        ("wrong_secret", hs256(secret="another-secret-that-is-also-long-enough!")),
        ("alg_none", handmade("none", {"sub": "admin"})),
        ("alg_none_with_sig", handmade("none", {"sub": "admin"}, SECRET.encode())),
        ("expired", hs256({"exp": now - 60})),
        ("expired_past_leeway", hs256({"exp": now - 10})),
        ("nbf_future", hs256({"nbf": now + 86_400})),  # made at collection time
        ("sub_not_string", jwt.encode({"sub": 7}, SECRET, algorithm="HS256")),
    ]


@pytest.mark.parametrize(("name", "token"), _bad_hs256_tokens())
async def test_bad_hs256_tokens_401(name: str, token: str) -> None:
    async with running_server(jwt_secret=SECRET) as server:
        for headers, target in [
            (bearer(token), STREAM),
            ([("Cookie", f"sseserver_token={token}")], STREAM),
            ([], f"{STREAM}&access_token={quote(token)}"),
        ]:
            resp = await fetch(server.port, target, headers)
            assert_401(resp)
            if name.startswith("expired"):
                assert resp.json()["error"]["code"] == "token_expired"


async def test_wrong_algorithm_with_a_public_key_401(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    pem = public_pem(rsa_key)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tokens = {
        # Algorithm confusion: HS256 keyed with the (public!) PEM.
        "hs256_keyed_with_public_pem": handmade("HS256", {"sub": "admin"}, pem.encode()),
        "hs256_plain": hs256(),
        "none": handmade("none", {"sub": "admin"}),
        "rs256_other_key": jwt.encode({"sub": "x"}, other, algorithm="RS256"),
        "es256_against_rsa_key": jwt.encode({"sub": "x"}, ec_key, algorithm="ES256"),
        "rs384_right_key": jwt.encode({"sub": "x"}, rsa_key, algorithm="RS384"),
    }
    async with running_server(jwt_public_key=pem) as server:
        for name, token in tokens.items():
            resp = await fetch(server.port, STREAM, bearer(token))
            assert resp.status == 401, (name, resp.status)
            assert_401(resp)


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        ({"aud": "sse", "iss": "https://id.example"}, True),
        ({"aud": ["x", "sse"], "iss": "https://id.example"}, True),
        ({"aud": "other", "iss": "https://id.example"}, False),
        ({"iss": "https://id.example"}, False),
        ({"aud": "sse", "iss": "https://evil.example"}, False),
        ({"aud": "sse"}, False),
    ],
)
async def test_audience_and_issuer(claims: dict[str, Any], ok: bool) -> None:
    async with running_server(
        jwt_secret=SECRET, jwt_audience="sse", jwt_issuer="https://id.example"
    ) as server:
        if ok:
            await assert_streams(server.port, STREAM, bearer(hs256(claims)))
        else:
            assert_401(await fetch(server.port, STREAM, bearer(hs256(claims))))


async def test_auth_failures_never_leak_the_secret() -> None:
    async with running_server(jwt_secret=SECRET) as server:
        resp = await fetch(server.port, STREAM, bearer(hs256(secret="x" * 40)))
        assert_401(resp)
        assert SECRET.encode() not in resp.body


# --------------------------------------------------------------------------------------
# Mercure claims: 403
# --------------------------------------------------------------------------------------

FORM = [("Content-Type", "application/x-www-form-urlencoded")]


async def test_mercure_topic_not_allowed_403() -> None:
    sub_token = hs256({"mercure": {"subscribe": ["news/{id}"]}})
    pub_token = hs256({"mercure": {"publish": ["news/1"]}})
    no_claims = hs256()
    async with running_server(jwt_secret=SECRET) as server:
        port = server.port
        for token, topic in [(sub_token, "sports/1"), (no_claims, "news/1"), (pub_token, "news/1")]:
            resp = await fetch(port, f"/.well-known/mercure?topic={quote(topic)}", bearer(token))
            assert_error(resp, 403, "forbidden")
        resp = await fetch(
            port, "/.well-known/mercure?topic=news/1&topic=sports/1", bearer(sub_token)
        )
        assert_error(resp, 403, "forbidden")
        for token, topic in [(sub_token, "news/1"), (no_claims, "news/1"), (pub_token, "news/2")]:
            body = urlencode({"topic": topic, "data": "x"}).encode()
            resp = await fetch(
                port, "/.well-known/mercure", bearer(token) + FORM, method="POST", body=body
            )
            assert_error(resp, 403, "forbidden")

        # Allowed: the subscriber sees the publication.
        async with await Client.open(port) as subscriber:
            subscriber.send("GET", "/.well-known/mercure?topic=news/1", bearer(sub_token))
            assert (await subscriber.head()).status == 200
            body = urlencode({"topic": "news/1", "data": "hello"}).encode()
            resp = await fetch(
                port, "/.well-known/mercure", bearer(pub_token) + FORM, method="POST", body=body
            )
            assert resp.status == 200, resp.body
            event = await subscriber.next_event()
            assert event.data == "hello"
            assert event.last_event_id == resp.body.decode()


# --------------------------------------------------------------------------------------
# Public paths
# --------------------------------------------------------------------------------------


async def test_health_paths_never_authenticated_nor_limited() -> None:
    async with running_server(jwt_secret=SECRET, rate=parse_rate("1/60s")) as server:
        port = server.port
        for i in range(30):
            for path in ("/healthz", "/readyz"):
                headers = bearer("garbage") if i % 2 else []
                resp = await fetch(port, path, headers)
                assert resp.status == 200, (path, i, resp.status, resp.body)
        # The limit is really on: the second authenticated request is refused.
        token = hs256()
        assert (await fetch(port, LIMITED, bearer(token))).status == 404
        assert_error(await fetch(port, LIMITED, bearer(token)), 429, "rate_limited")
        for path in ("/healthz", "/readyz"):
            assert (await fetch(port, path)).status == 200


async def test_open_paths_need_no_token() -> None:
    async with running_server(jwt_secret=SECRET) as server:
        for path in ("/", "/static/app.js", "/metrics", "/v1/providers"):
            resp = await fetch(server.port, path)
            assert resp.status == 200, (path, resp.status)


# --------------------------------------------------------------------------------------
# Token expiry mid-stream
# --------------------------------------------------------------------------------------


async def _expires_mid_stream(exp_offset: float, lower: float, upper: float) -> None:
    token = hs256({"exp": int(time.time() + exp_offset)})
    async with running_server(jwt_secret=SECRET, heartbeat_s=0.5) as server:
        async with await Client.open(server.port) as client:
            started = time.monotonic()
            client.send("GET", LONG_STREAM, bearer(token))
            resp = await client.head()
            assert resp.status == 200
            events: list[Event] = []
            while True:
                event = await client.next_event(within=upper + 2)
                events.append(event)
                if event.type == "error":
                    break
            elapsed = time.monotonic() - started
            error = json.loads(events[-1].data)
            assert error["code"] == "token_expired", error
            assert lower <= elapsed <= upper, elapsed
            assert events[0].type == "start"
            assert sum(e.type == "message" for e in events) >= 1 or lower == 0
            # Nothing but metrics/[DONE] may follow; then the body ends.
            rest = await client.rest(within=3)
            assert all(e.type == "metrics" or e.data == "[DONE]" for e in rest), rest
            assert client.ended


async def test_token_expiring_mid_stream_ends_the_stream() -> None:
    await _expires_mid_stream(2.5, lower=1.0, upper=4.5)


async def test_token_expired_within_leeway_is_accepted_then_ends_at_once() -> None:
    # exp = now - 4 s: accepted thanks to the 5 s leeway, but already past its exp.
    await _expires_mid_stream(-4, lower=0.0, upper=2.0)


async def test_token_expiry_frees_the_stream_slot_and_counts() -> None:
    token = hs256({"exp": int(time.time()) + 1})
    async with running_server(jwt_secret=SECRET, heartbeat_s=0.5) as server:
        async with await Client.open(server.port) as client:
            client.send("GET", LONG_STREAM, bearer(token))
            assert (await client.head()).status == 200
            while (await client.next_event(within=6)).type != "error":
                pass

        async def no_streams() -> bool:
            return not server.state.streams.streams

        await eventually(no_streams)


# --------------------------------------------------------------------------------------
# Auth off: said loudly at start-up
# --------------------------------------------------------------------------------------


def _startup_output(*args: str, env: dict[str, str] | None = None) -> str:
    with server_process(*args, env=env) as (proc, _port):
        proc.terminate()
        assert proc.stdout is not None
        out = proc.stdout.read().decode(errors="replace")
        proc.wait(15)
    return out


def test_auth_off_is_logged_at_start_up() -> None:
    base_env = {"SSESERVER_JWT_SECRET": "", "SSESERVER_JWT_PUBLIC_KEY": ""}
    assert "authentication is off" in _startup_output(env=base_env)
    assert "authentication is off" not in _startup_output("--jwt-secret", SECRET, env=base_env)
    assert "authentication is off" not in _startup_output(
        env={**base_env, "SSESERVER_JWT_SECRET": SECRET}
    )


# --------------------------------------------------------------------------------------
# Rate limits: requests per window
# --------------------------------------------------------------------------------------


async def _hits(port: int, n: int, headers: Iterable[tuple[str, str]] = ()) -> list[Response]:
    return [await fetch(port, LIMITED, list(headers)) for _ in range(n)]


def assert_429(resp: Response) -> None:
    assert_error(resp, 429, "rate_limited")
    retry_after = resp.header("retry-after")
    assert retry_after is not None and retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= 60


async def test_fourth_request_in_window_429() -> None:
    async with running_server(rate=parse_rate("3/60s")) as server:
        first, second, third, fourth, fifth = await _hits(server.port, 5)
        assert [first.status, second.status, third.status] == [404, 404, 404]
        assert_429(fourth)
        assert_429(fifth)
        # Every later request in the window is refused too.
        async with await Client.open(server.port) as client:
            client.send("GET", LIMITED)
            assert_429(await client.response())


async def test_rate_limit_per_subject() -> None:
    alice, bob = hs256({"sub": "alice"}), hs256({"sub": "bob"})
    async with running_server(jwt_secret=SECRET, rate=parse_rate("3/60s")) as server:
        port = server.port
        assert [r.status for r in await _hits(port, 3, bearer(alice))] == [404] * 3
        assert_429((await _hits(port, 1, bearer(alice)))[0])
        # Another subject from the same address has a bucket of its own.
        assert [r.status for r in await _hits(port, 3, bearer(bob))] == [404] * 3
        assert_429((await _hits(port, 1, bearer(bob)))[0])
        # A fresh token for alice is still alice.
        assert_429((await _hits(port, 1, bearer(hs256({"sub": "alice", "x": 1}))))[0])
        # A token without a subject falls back to the client address (untouched so far).
        anon = hs256({"sub": None})
        anon = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
        assert [r.status for r in await _hits(port, 3, bearer(anon))] == [404] * 3
        assert_429((await _hits(port, 1, bearer(anon)))[0])


async def test_rate_limit_per_ip_with_trusted_proxy() -> None:
    async with running_server(rate=parse_rate("3/60s"), trusted_proxies=("127.0.0.1",)) as server:
        port = server.port

        def xff(value: str) -> list[tuple[str, str]]:
            return [("X-Forwarded-For", value)]

        assert [r.status for r in await _hits(port, 3, xff("203.0.113.1"))] == [404] * 3
        assert_429((await _hits(port, 1, xff("203.0.113.1")))[0])
        # Another client behind the proxy: a bucket of its own.
        assert [r.status for r in await _hits(port, 3, xff("203.0.113.2"))] == [404] * 3
        # The proxy appends the real address: what the client put in front is ignored.
        assert_429((await _hits(port, 1, xff("198.51.100.7, 203.0.113.1")))[0])
        # Trusted hops on the right are skipped.
        assert_429((await _hits(port, 1, xff("203.0.113.1, 127.0.0.1")))[0])
        # X-Real-IP when no X-Forwarded-For.
        real = [("X-Real-IP", "203.0.113.9")]
        assert [r.status for r in await _hits(port, 3, real)] == [404] * 3
        assert_429((await _hits(port, 1, real))[0])
        # The proxy itself, without forwarding headers, is a client like any other.
        assert [r.status for r in await _hits(port, 3)] == [404] * 3
        assert_429((await _hits(port, 1))[0])


@pytest.mark.parametrize("trusted", [(), ("10.0.0.1",), ("192.168.0.0/16", "::1")])
async def test_forwarded_headers_from_untrusted_peers_are_ignored(
    trusted: tuple[str, ...],
) -> None:
    async with running_server(rate=parse_rate("3/60s"), trusted_proxies=trusted) as server:
        port = server.port
        statuses = []
        for i in range(6):
            headers = [("X-Forwarded-For", f"203.0.113.{i}"), ("X-Real-IP", f"198.51.100.{i}")]
            statuses.append((await fetch(port, LIMITED, headers)).status)
        assert statuses == [404, 404, 404, 429, 429, 429]


async def test_rate_limit_rejections_carry_retry_after_within_window() -> None:
    async with running_server(rate=parse_rate("2/5s")) as server:
        resps = await _hits(server.port, 3)
        assert [r.status for r in resps[:2]] == [404, 404]
        assert_error(resps[2], 429, "rate_limited")
        assert 1 <= int(resps[2].header("retry-after") or "0") <= 5


# --------------------------------------------------------------------------------------
# Rate limits: concurrent streams
# --------------------------------------------------------------------------------------


async def _open_stream(port: int, headers: Iterable[tuple[str, str]] = ()) -> Client:
    client = await Client.open(port)
    client.send("GET", LONG_STREAM, list(headers))
    resp = await client.head()
    assert resp.status == 200, (resp.status, await client.body())
    await client.next_event()  # start
    return client


async def test_third_concurrent_stream_429_until_one_closes() -> None:
    async with running_server(max_streams_per_subject=2) as server:
        port = server.port
        first = await _open_stream(port)
        second = await _open_stream(port)
        resp = await fetch(port, LONG_STREAM)
        assert_error(resp, 429, "too_many_streams")
        assert (resp.header("retry-after") or "").isdigit()
        # Requests that are not streams are not capped.
        assert (await fetch(port, "/v1/providers")).status == 200
        publish = urlencode({"topic": "t", "data": "x"}).encode()
        resp = await fetch(port, "/.well-known/mercure", FORM, method="POST", body=publish)
        assert resp.status == 200, resp.body
        await first.close()

        async def admitted() -> bool:
            resp_head = None
            client = await Client.open(port)
            client.send("GET", LONG_STREAM)
            resp_head = await client.head()
            if resp_head.status == 200:
                third.append(client)
                return True
            await client.body()
            await client.close()
            return False

        third: list[Client] = []
        await eventually(admitted)
        assert_error(await fetch(port, LONG_STREAM), 429, "too_many_streams")
        for client in (second, *third):
            await client.close()


async def test_stop_button_works_at_the_stream_cap() -> None:
    """POST /v1/streams/{id}/cancel is not a stream: a user at the cap must still be able
    to stop the generation that holds the slot."""
    async with running_server(max_streams_per_subject=1) as server:
        port = server.port
        held = await Client.open(port)
        held.send("GET", LONG_STREAM)
        assert (await held.head()).status == 200
        start = await held.next_event()
        assert start.type == "start"
        gen_id = json.loads(start.data)["id"]
        resp = await fetch(port, f"/v1/streams/{gen_id}/cancel", method="POST")
        assert resp.status == 200, (resp.status, resp.body)
        assert resp.json()["cancelled"] is True
        await held.close()


async def test_concurrent_streams_per_subject() -> None:
    alice, bob = hs256({"sub": "alice"}), hs256({"sub": "bob"})
    async with running_server(jwt_secret=SECRET, max_streams_per_subject=2) as server:
        port = server.port
        streams = [await _open_stream(port, bearer(alice)) for _ in range(2)]
        assert_error(await fetch(port, LONG_STREAM, bearer(alice)), 429, "too_many_streams")
        streams.append(await _open_stream(port, bearer(bob)))
        for client in streams:
            await client.close()


async def test_finished_streams_free_their_slot() -> None:
    async with running_server(max_streams_per_subject=1) as server:
        for _ in range(4):  # each completes before the next: never over the cap
            await assert_streams(server.port, STREAM, [])


async def test_rejected_stream_does_not_consume_a_slot() -> None:
    async with running_server(max_streams_per_subject=1) as server:
        held = await _open_stream(server.port)
        for _ in range(5):
            assert_error(await fetch(server.port, LONG_STREAM), 429, "too_many_streams")
        await held.close()

        async def free() -> bool:
            resp = await fetch(server.port, STREAM)
            return resp.status == 200

        await eventually(free)


# --------------------------------------------------------------------------------------
# CORS
# --------------------------------------------------------------------------------------

ORIGIN = "https://app.example"


def cors_headers(resp: Response) -> dict[str, str]:
    return {
        k.decode().lower(): v.decode("latin-1")
        for k, v in resp.headers
        if k.lower().startswith(b"access-control-")
    }


def assert_cors_for(resp: Response, origin: str) -> None:
    headers = cors_headers(resp)
    assert headers.get("access-control-allow-origin") == origin, headers
    assert headers.get("access-control-allow-credentials") == "true", headers
    vary = {v.strip().lower() for value in resp.header_values("vary") for v in value.split(",")}
    assert "origin" in vary, resp.headers


async def test_listed_origin_gets_cors_headers() -> None:
    async with running_server(cors_origins=(ORIGIN, "https://other.example")) as server:
        resp = await fetch(server.port, "/healthz", [("Origin", ORIGIN)])
        assert resp.status == 200
        assert_cors_for(resp, ORIGIN)
        exposed = (cors_headers(resp).get("access-control-expose-headers") or "").lower()
        assert "last-event-id" in exposed and "x-request-id" in exposed
        # On an event stream too.
        async with await Client.open(server.port) as client:
            client.send("GET", STREAM, [("Origin", ORIGIN)])
            head = await client.head()
            assert head.status == 200
            assert_cors_for(head, ORIGIN)
            await client.rest()


async def test_refusals_carry_cors_headers_so_the_page_can_read_them() -> None:
    async with running_server(
        cors_origins=(ORIGIN,), jwt_secret=SECRET, rate=parse_rate("1/60s")
    ) as server:
        resp = await fetch(server.port, LIMITED, [("Origin", ORIGIN)])
        assert_401(resp)
        assert_cors_for(resp, ORIGIN)
        token = hs256()
        await fetch(server.port, LIMITED, [("Origin", ORIGIN), *bearer(token)])
        resp = await fetch(server.port, LIMITED, [("Origin", ORIGIN), *bearer(token)])
        assert_error(resp, 429)
        assert_cors_for(resp, ORIGIN)


async def test_preflight_answered_204() -> None:
    async with running_server(cors_origins=(ORIGIN,), jwt_secret=SECRET) as server:
        resp = await fetch(
            server.port,
            "/v1/stream",
            [
                ("Origin", ORIGIN),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type, authorization, last-event-id"),
            ],
            method="OPTIONS",
        )
        assert resp.status == 204, (resp.status, resp.body)
        assert resp.body == b""
        headers = cors_headers(resp)
        assert headers["access-control-allow-origin"] == ORIGIN
        assert headers["access-control-allow-credentials"] == "true"
        methods = {m.strip() for m in headers["access-control-allow-methods"].split(",")}
        assert {"GET", "POST"} <= methods
        allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
        assert {"content-type", "authorization", "last-event-id"} <= allowed
        assert int(headers["access-control-max-age"]) > 0


async def test_preflight_echoes_only_sane_header_names() -> None:
    async with running_server(cors_origins=(ORIGIN,)) as server:
        resp = await fetch(
            server.port,
            "/v1/chat",
            [
                ("Origin", ORIGIN),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "x-ok, bad header, x:y, <script>, x-two"),
            ],
            method="OPTIONS",
        )
        assert resp.status == 204
        allowed = [h.strip() for h in cors_headers(resp)["access-control-allow-headers"].split(",")]
        assert allowed == ["x-ok", "x-two"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.evil.example",
        "https://evilapp.example",
        "http://app.example",
        "https://app.example:8443",
        "null",
        "",
    ],
)
async def test_unlisted_origin_gets_no_cors_headers(origin: str) -> None:
    async with running_server(cors_origins=(ORIGIN,)) as server:
        resp = await fetch(server.port, "/healthz", [("Origin", origin)])
        assert resp.status == 200
        assert cors_headers(resp) == {}
        resp = await fetch(
            server.port,
            "/v1/stream",
            [("Origin", origin), ("Access-Control-Request-Method", "POST")],
            method="OPTIONS",
        )
        assert resp.status in (204, 403)
        assert cors_headers(resp) == {}


async def test_no_cors_configured_no_cors_headers() -> None:
    async with running_server() as server:
        resp = await fetch(server.port, "/healthz", [("Origin", ORIGIN)])
        assert cors_headers(resp) == {}


async def test_auth_and_rate_limit_refusals_answer_head_with_the_head_only() -> None:
    """401 and 429 asked with HEAD: the head a GET would get (its Content-Length too),
    no body, and the connection stays usable (a body would be read as garbage)."""
    async with running_server(jwt_secret=SECRET, rate=parse_rate("1/60s")) as server:
        async with await Client.open(server.port) as client:
            client.send("HEAD", STREAM)
            unauthorized = await client.response(10)
            assert unauthorized.status == 401 and unauthorized.body == b""
            assert int(unauthorized.header("content-length") or 0) > 0
            carol = bearer(hs256({"sub": "carol"}))
            client.send("HEAD", LIMITED, carol)
            assert (await client.response(10)).status == 404
            client.send("HEAD", LIMITED, carol)
            limited = await client.response(10)
            assert limited.status == 429 and limited.body == b""
            assert limited.header("retry-after") is not None
            client.send("GET", "/healthz")
            assert (await client.response(10)).status == 200

"""Fuzzing request heads and bodies with Hypothesis against one in-process server (SPEC §3):
whatever arrives, a valid status or a close within the head timeout, nothing left behind.
Deterministic in `make test` (the ci profile); `make fuzz` draws fresh examples.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.hardening import (
    HARDENED,
    HEAD_TIMEOUT,
    SLACK,
    assert_sane,
    exchange,
    healthz,
    thread_server,
)

pytestmark = pytest.mark.timeout(240)

# --------------------------------------------------------------------------------------
# Fuzzing with Hypothesis
# --------------------------------------------------------------------------------------

KNOWN_TARGETS = [
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/providers",
    "/v1/stream",
    "/v1/stream?tokens=3&interval_ms=1",
    "/v1/stream?provider=openai",
    "/v1/streams/abc",
    "/v1/streams/abc/cancel",
    "/v1/chat",
    "/v1/chat/completions",
    "/.well-known/mercure",
    "/.well-known/mercure?topic=a",
    "/static/app.js",
    "/static/../pyproject.toml",
    "*",
]
KNOWN_HEADERS = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Content-Type",
    b"Connection",
    b"Expect",
    b"Authorization",
    b"Cookie",
    b"Last-Event-ID",
    b"X-Forwarded-For",
    b"X-Request-ID",
    b"Origin",
    b"Access-Control-Request-Method",
    b"Upgrade",
]
TRICKY_VALUES = [
    b"",
    b"0",
    b"-1",
    b"5",
    b"99999999999999999999",
    b"chunked",
    b"gzip, chunked",
    b"close",
    b"keep-alive",
    b"100-continue",
    b"application/json",
    b"application/x-www-form-urlencoded",
    b"Bearer x.y.z",
    b"websocket",
    b"\xff\xfe",
    b"a\r\nX-Injected: 1",
    b"a\rb",
    b"x" * 5000,
]
FORM_TYPE = b"application/x-www-form-urlencoded"
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

KNOWN_METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"CONNECT", b"get"]
methods = st.one_of(
    st.sampled_from(KNOWN_METHODS),
    st.sampled_from(KNOWN_METHODS[:3]),
    st.text(TOKEN_CHARS, min_size=1, max_size=10).map(str.encode),
    st.binary(max_size=8),
)
targets = st.one_of(
    st.sampled_from(KNOWN_TARGETS).map(str.encode),
    st.sampled_from(KNOWN_TARGETS).map(str.encode),
    st.tuples(st.sampled_from(KNOWN_TARGETS), st.text(max_size=30)).map(
        lambda t: (t[0] + t[1]).encode("utf-8", "surrogatepass")
    ),
    st.tuples(
        st.sampled_from(["/v1/stream?", "/.well-known/mercure?", "/v1/streams/x?"]),
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "tokens",
                        "interval_ms",
                        "size",
                        "ttft_ms",
                        "provider",
                        "model",
                        "q",
                        "topic",
                        "lastEventID",
                        "access_token",
                    ]
                ),
                st.text(max_size=12),
            ),
            max_size=4,
        ),
    ).map(lambda t: (t[0] + urlencode(t[1])).encode()),
    st.binary(max_size=40),
)
header_names = st.one_of(
    st.sampled_from(KNOWN_HEADERS),
    st.sampled_from(KNOWN_HEADERS),
    st.text(TOKEN_CHARS, min_size=1, max_size=16).map(str.encode),
    st.binary(max_size=16),
)
header_values = st.one_of(
    st.sampled_from(TRICKY_VALUES),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=48).map(str.encode),
    st.binary(max_size=48),
)
versions = st.sampled_from(
    [b"HTTP/1.1"] * 4
    + [b"HTTP/1.0"] * 2
    + [b"HTTP/2.0", b"HTTP/1.", b"", b"http/1.1", b"HTTP/1.1 "]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.one_of(
            json_values,
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                        "content": json_values,
                        "parts": st.lists(
                            st.fixed_dictionaries(
                                {"type": st.sampled_from(["text", "file"])},
                                optional={"text": json_values},
                            ),
                            max_size=3,
                        ),
                    },
                ),
                max_size=3,
            ),
        ),
        "params": st.dictionaries(
            st.sampled_from(["tokens", "interval_ms", "size", "ttft_ms", "system", "max_tokens"]),
            st.one_of(st.integers(-5, 50), st.floats(allow_nan=True), st.text(max_size=5)),
            max_size=3,
        ),
        "sseserver": st.dictionaries(
            st.sampled_from(["tokens", "interval_ms"]), st.integers(-5, 20), max_size=2
        ),
        "provider": json_values,
        "model": json_values,
        "stream": st.booleans(),
        "stream_options": json_values,
        "temperature": json_values,
    },
).map(lambda d: json.dumps(d).encode())
form_bodies = st.lists(
    st.tuples(
        st.sampled_from(["topic", "data", "id", "type", "retry", "private"]),
        st.text(max_size=20),
    ),
    max_size=6,
).map(lambda fields: urlencode(fields).encode())
bodies = st.one_of(st.binary(max_size=300), chat_bodies, form_bodies, st.just(b""))


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[list[bytes], str]:
    mode = draw(st.sampled_from(["full", "full", "full", "truncated", "garbage", "split"]))
    if mode == "garbage":
        data = draw(st.binary(min_size=1, max_size=400))
    else:
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
        line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
        headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
        if draw(st.integers(0, 4)):
            headers.insert(0, (b"Host", b"x"))
        body = draw(bodies)
        if body and draw(st.integers(0, 3)):
            headers.append((b"Content-Length", str(len(body)).encode()))
        if body and draw(st.booleans()):
            ctype = b"application/json" if body[:1] == b"{" else FORM_TYPE
            headers.append((b"Content-Type", ctype))
        head = eol.join([line, *(n + b": " + v for n, v in headers)]) + eol + eol
        data = head + body
        if mode == "truncated":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4))) if mode == "split" else []
    chunks, last = [], 0
    for cut in [*cuts, len(data)]:
        chunks.append(data[last:cut])
        last = cut
    end = draw(st.sampled_from(["read", "read", "half_close", "rst"]))
    return [c for c in chunks if c] or [b""], end


def test_fuzzed_requests_never_crash_hang_or_leak() -> None:
    with thread_server(**HARDENED) as (server, errors):
        assert healthz(server.port) == 200
        baseline = server.settle(10**6)["tasks"]
        seen: list[tuple[str, str]] = []

        @settings(
            max_examples=int(os.environ.get("SSESERVER_FUZZ_EXAMPLES", "200")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(request=raw_requests())
        def one(request: tuple[list[bytes], str]) -> None:
            chunks, end = request
            outcome = exchange(server.port, chunks, end=end)
            if end != "rst":
                assert_sane(outcome, b"".join(chunks)[:200])
                assert outcome.elapsed < HEAD_TIMEOUT + SLACK, (outcome, b"".join(chunks)[:200])
            seen.append((end, repr(outcome)))

        one()
        assert healthz(server.port) == 200
        left = server.settle(baseline)
        assert left["connections"] == 0, left
        assert left["handlers"] == 0 and left["streams"] == 0, left
        assert left["tasks"] <= baseline, (left, baseline)
        assert errors.messages() == [], errors.messages()[:5]
        assert len(seen) > 20

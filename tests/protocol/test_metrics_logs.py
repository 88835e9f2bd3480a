"""Operations over real sockets (SPEC §10): ``/metrics`` in Prometheus text (parsed with
prometheus-client's own parser) with the gauges, histograms and counters an operator
graphs; ``--log-format json`` (one JSON object a line, one access line per request or
stream); ``X-Request-ID`` taken from the proxy when sane, made up otherwise, echoed."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sseserver.config import parse_rate
from tests.support.oracle import Client, fetch
from tests.support.procs import server_process
from tests.support.servers import running_server
from tests.support.sse_parser import Event
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(60)

SECRET = "metrics-test-secret-long-enough-for-hs256!!"
LONG_STREAM = "/v1/stream?tokens=100000&interval_ms=20"
GENERATED_ID = re.compile(r"[0-9a-f]{16}")

# --------------------------------------------------------------------------------------
# Scraping
# --------------------------------------------------------------------------------------


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample_name: str, **labels: str) -> float:
        """The sample's value (0 when the labelled child does not exist yet)."""
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == sample_name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0


async def scrape(port: int) -> Scrape:
    resp = await fetch(port, "/metrics")
    assert resp.status == 200
    ctype = resp.header("content-type") or ""
    assert ctype.startswith("text/plain") and "version=" in ctype, ctype
    return Scrape(resp.body.decode())


async def stream_to_end(port: int, target: str) -> list[Event]:
    async with await Client.open(port) as client:
        client.send("GET", target)
        assert (await client.head()).status == 200
        return await client.rest(10)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

EXPECTED_FAMILIES = {
    "sseserver_open_connections": "gauge",
    "sseserver_open_streams": "gauge",
    "sseserver_ttft_seconds": "histogram",
    "sseserver_tokens": "counter",
    "sseserver_stream_bytes": "counter",
    "sseserver_stream_duration_seconds": "histogram",
    "sseserver_disconnects": "counter",
    "sseserver_upstream_errors": "counter",
    "sseserver_slow_client_drops": "counter",
    "sseserver_rate_limited": "counter",
    "sseserver_auth_failures": "counter",
}


async def test_metrics_is_prometheus_text_with_every_family() -> None:
    async with running_server() as server:
        metrics = await scrape(server.port)
        for name, kind in EXPECTED_FAMILIES.items():
            assert name in metrics.families, sorted(metrics.families)
            assert metrics.families[name].type == kind, (name, metrics.families[name].type)


async def test_metrics_of_a_completed_stream() -> None:
    async with running_server(heartbeat_s=0.5) as server:
        port = server.port
        events = await stream_to_end(port, "/v1/stream?tokens=7&interval_ms=1")
        assert events[-1].data == "[DONE]"

        async def observed() -> bool:
            m = await scrape(port)
            return m.value("sseserver_disconnects_total", reason="complete") >= 1

        await eventually(observed)
        m = await scrape(port)
        assert m.value("sseserver_ttft_seconds_count", provider="synthetic") == 1
        assert m.value("sseserver_ttft_seconds_sum", provider="synthetic") > 0
        assert m.value("sseserver_ttft_seconds_bucket", provider="synthetic", le="+Inf") == 1
        assert m.value("sseserver_tokens_total", provider="synthetic") == 7
        assert m.value("sseserver_stream_bytes_total") > 7 * len("data: {}\n\n")
        assert m.value("sseserver_stream_duration_seconds_count") == 1
        assert m.value("sseserver_stream_duration_seconds_sum") > 0
        assert m.value("sseserver_disconnects_total", reason="complete") == 1
        assert m.value("sseserver_requests_total", status="200") >= 1


async def test_gauges_are_true_at_the_moment_of_the_scrape() -> None:
    """Open connections, open streams by kind and history bytes read right at once, with
    a heartbeat (the shared tick) far longer than the test: no timer sets them."""
    async with running_server(heartbeat_s=3600) as server:
        port = server.port
        idle = [await Client.open(port) for _ in range(3)]
        streams = []
        for _ in range(2):
            client = await Client.open(port)
            client.send("GET", LONG_STREAM)
            assert (await client.head()).status == 200
            assert (await client.next_event()).type == "start"
            streams.append(client)
        subscriber = await Client.open(port)
        subscriber.send("GET", "/.well-known/mercure?topic=news")
        assert (await subscriber.head()).status == 200

        m = await scrape(port)
        assert m.value("sseserver_open_connections") == 7  # 3 idle, 3 streams, the scrape
        assert m.value("sseserver_open_streams", kind="generation") == 2
        assert m.value("sseserver_open_streams", kind="subscription") == 1
        assert m.value("sseserver_history_bytes") > 0  # two generations' events

        for client in [*idle, *streams, subscriber]:
            await client.close()

        async def down() -> bool:
            m = await scrape(port)
            return (
                m.value("sseserver_open_connections") == 1  # the scrape's own
                and m.value("sseserver_open_streams", kind="generation") == 0
                and m.value("sseserver_open_streams", kind="subscription") == 0
            )

        # Closing is the client's act; the server learns of it when the FIN arrives.
        await eventually(down)


async def test_client_disconnect_counted() -> None:
    async with running_server(heartbeat_s=0.5) as server:
        port = server.port
        async with await Client.open(port) as client:
            client.send("GET", LONG_STREAM)
            assert (await client.head()).status == 200
            assert (await client.next_event()).type == "start"
            await client.next_event()

        async def counted() -> bool:
            m = await scrape(port)
            return m.value("sseserver_disconnects_total", reason="client") == 1

        await eventually(counted)
        m = await scrape(port)
        assert m.value("sseserver_disconnects_total", reason="complete") == 0
        assert m.value("sseserver_stream_duration_seconds_count") == 1


async def test_slow_mercure_subscriber_counted() -> None:
    """A subscriber that reads nothing is cut once its buffer bound is hit (SPEC §5), and
    the cut shows as disconnects{reason="slow"} and slow_client_drops."""
    async with running_server(heartbeat_s=0.5, write_buffer_bytes=16 * 1024) as server:
        port = server.port
        slow = await Client.open(port, rcvbuf=4096)
        slow.send("GET", "/.well-known/mercure?topic=firehose")
        assert (await slow.head()).status == 200  # and then never read again
        form = [("Content-Type", "application/x-www-form-urlencoded")]
        payload = urlencode({"topic": "firehose", "data": "x" * 60_000}).encode()
        dropped = False
        deadline = time.monotonic() + 20
        for i in range(2000):
            resp = await fetch(port, "/.well-known/mercure", form, method="POST", body=payload)
            assert resp.status == 200, resp.body
            if i % 20 == 19:
                m = await scrape(port)
                if m.value("sseserver_slow_client_drops_total") >= 1:
                    dropped = True
                    break
            assert time.monotonic() < deadline, "the slow subscriber was never dropped"
        assert dropped
        m = await scrape(port)
        assert m.value("sseserver_disconnects_total", reason="slow") == 1
        assert m.value("sseserver_slow_client_drops_total") == 1
        slow.writer.transport.abort()


async def test_rate_limit_rejections_counted() -> None:
    async with running_server(rate=parse_rate("2/60s"), max_streams_per_subject=1) as server:
        port = server.port
        async with await Client.open(port) as held:
            held.send("GET", LONG_STREAM)
            assert (await held.head()).status == 200
            assert (await fetch(port, LONG_STREAM)).status == 429  # the stream cap
            assert (await fetch(port, LONG_STREAM)).status == 429  # the window (3rd)
            assert (await fetch(port, "/v1/streams/x")).status == 429
        m = await scrape(port)
        assert m.value("sseserver_rate_limited_total", limit="streams") == 1
        assert m.value("sseserver_rate_limited_total", limit="requests") == 2
        assert m.value("sseserver_requests_total", status="429") == 3


async def test_auth_failures_counted() -> None:
    async with running_server(jwt_secret=SECRET) as server:
        port = server.port
        assert (await fetch(port, "/v1/stream")).status == 401
        bad = [("Authorization", "Bearer nope")]
        assert (await fetch(port, "/v1/stream", bad)).status == 401
        token = jwt.encode({"sub": "a", "mercure": {"subscribe": ["x"]}}, SECRET)
        forbidden = await fetch(
            port, "/.well-known/mercure?topic=y", [("Authorization", f"Bearer {token}")]
        )
        assert forbidden.status == 403
        m = await scrape(port)
        assert m.value("sseserver_auth_failures_total", status="401") == 2
        # The family's help says "Requests refused 401/403".
        assert m.value("sseserver_auth_failures_total", status="403") == 1


# --------------------------------------------------------------------------------------
# X-Request-ID
# --------------------------------------------------------------------------------------

GOOD_IDS = ["abc-123", "7f1c2e9a.b:c_d", "x" * 128, "0"]
BAD_IDS = [
    "x" * 129,
    "x" * 300,
    "has space",
    'quote"d',
    "<script>alert(1)</script>",
    "semi;colon",
    "abc%0d%0aSet-Cookie:%20a=b",
    "caf\xe9",
    "tab\there",
    "",
]


@pytest.mark.parametrize("given", GOOD_IDS)
async def test_sane_request_id_is_echoed(given: str) -> None:
    async with running_server() as server:
        resp = await fetch(server.port, "/healthz", [("X-Request-ID", given)])
        assert resp.status == 200
        assert resp.header_values("x-request-id") == [given]


@pytest.mark.parametrize("given", BAD_IDS)
async def test_insane_request_id_is_replaced(given: str) -> None:
    async with running_server() as server:
        resp = await fetch(server.port, "/healthz", [("X-Request-ID", given)])
        assert resp.status == 200
        (echoed,) = resp.header_values("x-request-id")
        assert echoed != given
        assert GENERATED_ID.fullmatch(echoed), echoed


async def test_request_id_crlf_attempt_cannot_add_response_headers() -> None:
    async with running_server() as server:
        async with await Client.open(server.port) as client:
            # On the wire this is two request headers; neither may come back as ours.
            client.send_raw(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                b"X-Request-ID: abc\r\nSet-Cookie: evil=1\r\n\r\n"
            )
            resp = await client.response()
            assert resp.status == 200
            assert resp.header_values("x-request-id") == ["abc"]
            assert resp.header("set-cookie") is None
        async with await Client.open(server.port) as client:
            # A bare CR inside a header value is malformed (RFC 9110 §5.5): 400.
            client.send_raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\rb\r\n\r\n")
            resp = await client.response()
            assert resp.status == 400
            assert resp.header("set-cookie") is None


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [("GET", "/no/such/path", 404), ("DELETE", "/v1/stream", 405), ("OPTIONS", "/v1/chat", 204)],
)
async def test_request_id_on_routing_answers(method: str, target: str, status: int) -> None:
    """404 and 405 are answered by the router; they need the request id too, or the
    proxy's log line cannot be matched with ours."""
    async with running_server() as server:
        resp = await fetch(server.port, target, [("X-Request-ID", "r-1")], method=method)
        assert resp.status == status
        assert resp.header_values("x-request-id") == ["r-1"]


async def test_request_id_generated_when_absent_and_unique() -> None:
    async with running_server() as server:
        ids = set()
        for _ in range(5):
            resp = await fetch(server.port, "/healthz")
            (rid,) = resp.header_values("x-request-id")
            assert GENERATED_ID.fullmatch(rid)
            ids.add(rid)
        assert len(ids) == 5


async def test_request_id_on_streams_and_errors() -> None:
    async with running_server() as server:
        async with await Client.open(server.port) as client:
            client.send("GET", "/v1/stream?tokens=1&interval_ms=0", [("X-Request-ID", "s-1")])
            head = await client.head()
            assert head.status == 200
            assert head.header_values("x-request-id") == ["s-1"]
            await client.body()
        resp = await fetch(server.port, "/v1/stream?tokens=abc", [("X-Request-ID", "e-1")])
        assert resp.status == 400
        assert resp.header_values("x-request-id") == ["e-1"]


# --------------------------------------------------------------------------------------
# JSON logs (a real process)
# --------------------------------------------------------------------------------------


def _run_and_collect(
    work: Callable[[int], Coroutine[Any, Any, None]], *args: str
) -> list[dict[str, Any]]:
    with server_process("--log-format", "json", "--heartbeat-s", "0.5", *args) as (proc, port):
        asyncio.run(work(port))
        time.sleep(0.3)
        proc.terminate()
        assert proc.stdout is not None
        output = proc.stdout.read().decode("utf-8", errors="replace")
        assert proc.wait(15) == 0
    records = []
    for line in output.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)  # every line: exactly one JSON object
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(record), record
        records.append(record)
    return records


def _access(records: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    lines = [
        r
        for r in records
        if r.get("logger") == "sseserver.access" and r.get("request_id") == request_id
    ]
    assert len(lines) == 1, (request_id, lines)
    return lines[0]


def test_json_logs_one_object_a_line_with_access_fields() -> None:
    generated: list[str] = []

    async def work(port: int) -> None:
        async with await Client.open(port) as client:
            client.send(
                "GET", "/v1/stream?tokens=5&interval_ms=1&ttft_ms=20", [("X-Request-ID", "done-1")]
            )
            assert (await client.head()).status == 200
            await client.body()
        async with await Client.open(port) as client:
            client.send("GET", LONG_STREAM, [("X-Request-ID", "gone-1")])
            assert (await client.head()).status == 200
            await client.next_event()
            await client.next_event()
        resp = await fetch(port, "/healthz", [("X-Request-ID", "bad id\x7f" + "x" * 300)])
        generated.extend(resp.header_values("x-request-id"))
        async with await Client.open(port) as client:  # a refusal before any request id
            client.send_raw(b"NOT HTTP AT ALL\r\n\r\n")
            assert (await client.response()).status == 400
        await asyncio.sleep(0.5)  # let the disconnected stream's line be written

    records = _run_and_collect(work)
    assert any("authentication is off" in r["msg"] for r in records)

    done = _access(records, "done-1")
    assert done["path"] == "/v1/stream"
    assert done["status"] == 200
    assert isinstance(done["bytes"], int) and done["bytes"] > 0
    assert isinstance(done["duration_ms"], (int, float)) and done["duration_ms"] >= 20
    assert isinstance(done["ttft_ms"], (int, float)) and done["ttft_ms"] >= 15
    assert done["reason"] == "complete"
    assert done["level"] == "info"

    gone = _access(records, "gone-1")
    assert gone["status"] == 200
    assert gone["reason"] in ("client_disconnect", "cancelled")
    assert gone["bytes"] > 0
    assert isinstance(gone["duration_ms"], (int, float))

    (rid,) = generated
    assert GENERATED_ID.fullmatch(rid)
    assert _access(records, rid)["path"] == "/healthz"
    assert any(r.get("logger") == "sseserver.access" and r.get("status") == 400 for r in records), (
        "the refused request has an access line too"
    )


def test_json_access_line_of_a_stream_the_client_left_has_ttft() -> None:
    """Most long streams end with the client leaving: their line needs the TTFT too."""

    async def work(port: int) -> None:
        async with await Client.open(port) as client:
            client.send("GET", LONG_STREAM, [("X-Request-ID", "left-1")])
            assert (await client.head()).status == 200
            assert (await client.next_event()).type == "start"
            assert (await client.next_event()).type == "message"  # the first token came
        await asyncio.sleep(0.5)

    line = _access(_run_and_collect(work), "left-1")
    assert line["reason"] in ("client_disconnect", "cancelled"), line
    assert isinstance(line.get("ttft_ms"), (int, float)), line


def test_text_logs_by_default() -> None:
    with server_process() as (proc, _port):
        proc.terminate()
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        proc.wait(15)
    first = output.splitlines()[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)

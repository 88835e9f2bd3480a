"""Several instances on one Redis, and on a real 3-node Redis Cluster (SPEC §8): each
topic its own stream and channel, each instance reading only what its own readers need.

Server processes started with ``--hub redis://…`` or ``--hub redis+cluster://…``:

- an update published on A reaches subscribers on B and C, in order, once;
- a generation started on A is resumed on B after its reader moved there;
- a Stop pressed on B stops the generation on A;
- an instance nobody reads from receives nothing from Redis while the others stream
  and publish (its own metrics say so), while a subscribing instance does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from sseserver.providers.synthetic import token_text
from tests.support.hubclient import (
    all_ready,
    assert_resumed,
    logs,
    metric,
    move_mid_generation,
    publish_ok,
    request,
    subscribe,
    watch_from_start,
)
from tests.support.rawhttp import open_stream, read_until_id, text_of
from tests.support.redis_cluster import redis_cluster_running
from tests.support.redis_server import ServerProcess, redis_running, sseserver_running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(params=["server", "cluster"])
def hub_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """``--hub`` for one redis-server, or for a 3-node Redis Cluster."""
    if request.param == "server":
        with redis_running(tmp_path / "redis") as redis:
            yield redis.url
    else:
        with redis_cluster_running(tmp_path / "cluster") as cluster:
            yield cluster.url.replace("redis://", "redis+cluster://", 1)


def instances(
    stack: ExitStack, folder: Path, hub: str, *names: str, extra: tuple[str, ...] = ()
) -> list[ServerProcess]:
    args = ("--hub", hub, "--heartbeat-s", "1", "--shutdown-grace-s", "2", *extra)
    return [stack.enter_context(sseserver_running(folder, *args, name=n)) for n in names]


async def test_fan_out_across_instances(hub_url: str, tmp_path: Path) -> None:
    with ExitStack() as stack:
        a, b, c = instances(stack, tmp_path, hub_url, "a", "b", "c")
        await all_ready(a, b, c)
        client_b, reader_b = await subscribe(b.port, "news")
        client_c, reader_c = await subscribe(c.port, "news")
        async with client_b, client_c:
            ids = [f"n{i}" for i in range(30)]
            for i, event_id in enumerate(ids):
                await publish_ok((a, b, c)[i % 3].port, "news", f"d{i}", event_id)
            for reader in (reader_b, reader_c):
                events = await read_until_id(reader, ids[-1])
                assert [e.last_event_id for e in events] == ids, logs(a, b, c)
                assert [e.data for e in events] == [f"d{i}" for i in range(30)]
        # A generation on A, watched from C: the same tokens, once each.
        own, seen = await watch_from_start(a, c, 40)
        assert seen[-1].data == "[DONE]" and own[-1].data == "[DONE]"
        ids_seen = [e.last_event_id for e in seen]
        assert len(ids_seen) == len(set(ids_seen))
        assert text_of(seen) == "".join(token_text(i) for i in range(40))


async def test_resume_on_another_instance(hub_url: str, tmp_path: Path) -> None:
    tokens = 150  # ~3 s at 20 ms a token: still running long after the move to B
    with ExitStack() as stack:
        a, b = instances(stack, tmp_path, hub_url, "a", "b", extra=("--resume-grace-s", "2"))
        first, rest = await move_mid_generation(a, b, tokens)
        assert_resumed(first, rest, tokens)


async def test_cancel_from_another_instance(hub_url: str, tmp_path: Path) -> None:
    with ExitStack() as stack:
        a, b = instances(stack, tmp_path, hub_url, "a", "b")
        await all_ready(b)
        client, resp, reader = await open_stream(a.port, "/v1/stream?tokens=100000&interval_ms=20")
        async with client:
            assert resp.status == 200
            await reader.until(lambda r: len(r.parser.events) >= 2)
            gen_id = json.loads(reader.parser.events[0].data)["id"]
            answer = await request(b.port, "POST", f"/v1/streams/{gen_id}/cancel")
            assert answer.status == 200, (answer.body, logs(a, b))
            assert json.loads(answer.body) == {"id": gen_id, "cancelled": True}
            rest = await reader.rest(within=10)
        assert [json.loads(e.data)["code"] for e in rest if e.type == "error"] == ["cancelled"]
        assert rest[-1].data == "[DONE]"


async def test_an_instance_nobody_reads_from_receives_nothing(hub_url: str, tmp_path: Path) -> None:
    with ExitStack() as stack:
        a, idle, c = instances(stack, tmp_path, hub_url, "a", "idle", "c")
        await all_ready(a, idle, c)
        client_c, reader_c = await subscribe(c.port, "busy")
        async with client_c:
            streams = [
                await open_stream(a.port, "/v1/stream?tokens=50&interval_ms=5") for _ in range(4)
            ]
            for i in range(20):
                await publish_ok(a.port, "busy", f"d{i}", f"b{i}")
            await read_until_id(reader_c, "b19")
            for client, _resp, reader in streams:
                async with client:
                    assert (await reader.rest(within=20))[-1].data == "[DONE]"
        received_c = await metric(c.port, "sseserver_hub_received_total")
        assert received_c >= 20, logs(c)
        assert await metric(idle.port, "sseserver_hub_received_total") == 0, logs(idle)
        assert await metric(idle.port, "sseserver_hub_followed_topics") == 0
        # A ran the generations itself: it read none of its own tokens back either.
        assert await metric(a.port, "sseserver_hub_received_total") == 0, logs(a)


async def test_limits_are_shared_across_instances(hub_url: str, tmp_path: Path) -> None:
    """``--rate 4/60s`` and ``--max-streams-per-subject 1`` count on all instances (their
    keys in one slot each on a cluster)."""
    limits = ("--rate", "4/60s", "--max-streams-per-subject", "1")
    with ExitStack() as stack:
        a, b = instances(stack, tmp_path, hub_url, "a", "b", extra=limits)
        await all_ready(b)
        client, resp, _reader = await open_stream(a.port, "/v1/stream?tokens=100000&interval_ms=50")
        async with client:
            assert resp.status == 200
            refused = await request(b.port, "GET", "/v1/stream?tokens=1")
            assert refused.status == 429, refused.body
            assert json.loads(refused.body)["error"]["code"] == "too_many_streams"
        statuses = [
            (await request(server.port, "POST", "/.well-known/mercure", body=b"")).status
            for server in (a, b, a)
        ]
        # Two requests so far (the refused one counts too), two more within the 4 of the
        # window wherever they land, and the fifth is refused (/readyz never counts).
        assert 429 not in statuses[:2] and statuses[2] == 429, statuses

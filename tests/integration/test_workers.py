"""``--workers N`` (SPEC §10): N processes share one port with ``SO_REUSEPORT`` and, with the
Redis hub, share topics; the supervisor restarts a worker that dies; SIGTERM to the
supervisor ends every worker gracefully and exits 0.

Which worker holds a client's connection is read from ``/proc``: the server-side socket
of the connection (remote port = the client's local port) is found in ``/proc/net/tcp``
and its inode among the workers' file descriptors.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.support.procfs import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    alive,
    children,
    have_proc,
    socket_inodes,
    tcp_sockets,
)
from tests.support.rawhttp import RawClient, SSEReader, open_stream, read_until_id
from tests.support.redis_server import ServerProcess, redis_running, sseserver_running
from tests.support.requirements import require

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/.well-known/mercure"
FORM = [("Content-Type", "application/x-www-form-urlencoded")]


# -- /proc -------------------------------------------------------------------------------


def listening_workers(port: int, workers: set[int]) -> set[int]:
    listening = {inode for lp, _rp, st, inode in tcp_sockets() if lp == port and st == TCP_LISTEN}
    return {pid for pid in workers if socket_inodes(pid) & listening}


def worker_of(server_port: int, client_port: int, workers: set[int]) -> int | None:
    inodes = {
        inode
        for lp, rp, st, inode in tcp_sockets()
        if lp == server_port and rp == client_port and st == TCP_ESTABLISHED
    }
    for pid in workers:
        if socket_inodes(pid) & inodes:
            return pid
    return None


async def await_workers(
    sup: ServerProcess, count: int, within: float, exclude: Iterable[int] = ()
) -> set[int]:
    """Poll until ``count`` children of the supervisor listen on its port."""
    excluded = set(exclude)
    deadline = time.monotonic() + within
    found: set[int] = set()
    while time.monotonic() < deadline:
        kids = children(sup.pid) - excluded
        found = listening_workers(sup.port, kids)
        if len(kids) == count and len(found) == count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} listening workers expected, got {found}\n{sup.log()[-3000:]}")


# -- HTTP --------------------------------------------------------------------------------


async def publish_ok(port: int, topic: str, data: str, event_id: str) -> None:
    body = urlencode([("topic", topic), ("data", data), ("id", event_id)]).encode()
    async with await RawClient.connect(port) as client:
        client.request("POST", PATH, FORM, body)
        resp = await client.response(10)
    assert resp.status == 200, (resp.status, resp.body)


class Sub:
    def __init__(self, client: RawClient, reader: SSEReader, pid: int) -> None:
        self.client = client
        self.reader = reader
        self.pid = pid


async def open_subscribers(
    port: int, workers: set[int], stack: AsyncExitStack, per_worker: int = 3, limit: int = 60
) -> list[Sub]:
    """Open subscriber connections until every worker holds ``per_worker`` of them
    (the kernel picks the worker; bounded by ``limit`` connections)."""
    subs: list[Sub] = []
    for _ in range(limit):
        counts = {pid: sum(s.pid == pid for s in subs) for pid in workers}
        if all(c >= per_worker for c in counts.values()):
            return subs
        client, resp, reader = await open_stream(port, f"{PATH}?topic=shared")
        stack.push_async_callback(client.close)
        assert resp.status == 200
        local_port = client.writer.get_extra_info("sockname")[1]
        pid = None
        for _attempt in range(40):
            pid = worker_of(port, local_port, workers)
            if pid is not None:
                break
            await asyncio.sleep(0.025)
        assert pid is not None, f"no worker holds the connection from port {local_port}"
        subs.append(Sub(client, reader, pid))
    raise AssertionError(f"connections did not spread over the workers: {[s.pid for s in subs]}")


# -- the tests ---------------------------------------------------------------------------


@contextmanager
def workers_running(tmp_path: Path) -> Iterator[ServerProcess]:
    require("/proc/net/tcp", have_proc(), "needs Linux /proc")
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(
            tmp_path,
            "--workers",
            "2",
            "--hub",
            redis.url,
            "--heartbeat-s",
            "1",
            "--shutdown-grace-s",
            "2",
            name="supervisor",
        ) as sup,
    ):
        yield sup


async def test_workers_share_port_and_topics_and_restart(tmp_path: Path) -> None:
    with workers_running(tmp_path) as sup:
        port = sup.port
        workers = await await_workers(sup, 2, within=20)
        assert sup.pid not in workers
        async with AsyncExitStack() as stack:
            # 1. Connections spread over both workers (the kernel's SO_REUSEPORT hash).
            subs = await open_subscribers(port, workers, stack)
            assert {s.pid for s in subs} == workers

            # 2. A publish lands on one worker and reaches subscribers on both (Redis).
            ids = [f"w{i}" for i in range(6)]
            for i, event_id in enumerate(ids):
                await publish_ok(port, "shared", f"d{i}", event_id)
            for sub in subs:
                got = [e.last_event_id for e in await read_until_id(sub.reader, ids[-1])]
                assert got == ids, (sub.pid, sup.log()[-3000:])

            # 3. A worker that dies is started again; the other keeps serving meanwhile.
            victim = next(iter(workers))
            survivor = next(iter(workers - {victim}))
            os.kill(victim, signal.SIGKILL)
            for sub in subs:
                if sub.pid == victim:
                    assert await sub.client.closed_by_server(within=5.0)
            new_workers = await await_workers(sup, 2, within=15, exclude={victim})
            assert survivor in new_workers and victim not in new_workers
            assert sup.proc.poll() is None, "the supervisor must outlive a worker"
            assert "restarting" in sup.log()
            replacement = next(iter(new_workers - {survivor}))
            live = [s for s in subs if s.pid == survivor]
            live += await open_subscribers(port, new_workers, stack, per_worker=1)
            assert replacement in {s.pid for s in live}
            later = [f"v{i}" for i in range(4)]
            for i, event_id in enumerate(later):
                await publish_ok(port, "shared", f"late{i}", event_id)
            for sub in live:
                got = [e.last_event_id for e in await read_until_id(sub.reader, later[-1])]
                assert got[-len(later) :] == later, sub.pid
            # The replacement loaded the history from Redis: a resume works on it too.
            for _ in range(20):
                client, resp, reader = await open_stream(
                    port, f"{PATH}?topic=shared", headers=[("Last-Event-ID", "w3")]
                )
                stack.push_async_callback(client.close)
                assert resp.status == 200
                got = [e.last_event_id for e in await read_until_id(reader, later[-1])]
                assert got == [*ids[4:], *later]
                local_port = client.writer.get_extra_info("sockname")[1]
                if worker_of(port, local_port, new_workers) == replacement:
                    break
            else:
                raise AssertionError("no resume landed on the replacement worker")


async def test_sigterm_to_supervisor_stops_every_worker_and_exits_0(tmp_path: Path) -> None:
    with workers_running(tmp_path) as sup:
        workers = await await_workers(sup, 2, within=20)
        async with AsyncExitStack() as stack:
            await open_subscribers(sup.port, workers, stack, per_worker=2)
            started = time.monotonic()
            sup.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(sup.proc.wait, 20)
            took = time.monotonic() - started
        assert code == 0, sup.log()[-3000:]
        assert took < 2 + 5, f"stopping took {took:.1f}s"
        for _ in range(100):  # up to 5 s
            if not any(alive(pid) for pid in workers):
                break
            await asyncio.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "a worker outlived the supervisor"
        assert sup.log().count("shutting down") == 2


async def test_sigterm_ends_every_workers_streams_cleanly(tmp_path: Path) -> None:
    """SPEC §10: on SIGTERM open streams get a ``retry:`` field and the chunked
    terminator, not a bare close — in each worker."""
    with workers_running(tmp_path) as sup:
        workers = await await_workers(sup, 2, within=20)
        async with AsyncExitStack() as stack:
            subs = await open_subscribers(sup.port, workers, stack, per_worker=2)
            sup.proc.send_signal(signal.SIGTERM)
            cut: list[str] = []
            for sub in subs:
                try:
                    await sub.reader.rest(within=10)
                except Exception as exc:  # collected: the verdict names every stream
                    cut.append(f"worker {sub.pid}: {exc!r:.90}")
                    continue
                body = bytes(sub.reader.data)
                # The stream opened with one retry: field; shutdown must add another.
                if not body.endswith(b"retry: 2000\n\n") or body.count(b"retry: ") < 2:
                    cut.append(f"worker {sub.pid}: no retry: before the end")
            await asyncio.to_thread(sup.proc.wait, 20)
        assert cut == [], f"{len(cut)} of {len(subs)} streams not ended cleanly: {cut[:3]}"


async def _metrics_sample(port: int, name: str) -> float:
    """One scrape (answered by whichever worker the kernel picks): the sample's value."""
    async with await RawClient.connect(port) as client:
        client.request("GET", "/metrics")
        resp = await client.response(10.0)
    assert resp.status == 200
    for line in resp.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_metrics_are_summed_over_workers(tmp_path: Path) -> None:
    """Each scrape lands on one worker; with --workers it must still count them all.
    (60 connections from random ports spread over both workers: SO_REUSEPORT hashes.)"""
    with workers_running(tmp_path) as sup:
        await await_workers(sup, 2, within=20)
        for _ in range(60):
            async with await RawClient.connect(sup.port) as client:
                client.request("GET", "/v1/providers")
                assert (await client.response(10.0)).status == 200
        name = 'sseserver_requests_total{status="200"}'
        for _ in range(6):
            value = await _metrics_sample(sup.port, name)
            assert value >= 60, f"{name} = {value}: a scrape saw one worker's counts only"


async def test_gauges_are_summed_over_workers_at_the_moment_of_the_scrape(
    tmp_path: Path,
) -> None:
    """Open streams on both workers: every scrape, whichever worker answers it, sees all
    of them at once, and none once they are closed (each worker keeps its gauges true as
    streams open and close, not on a timer)."""
    with workers_running(tmp_path) as sup:
        await await_workers(sup, 2, within=20)
        subs = []
        for i in range(20):
            client = await RawClient.connect(sup.port)
            client.request("GET", f"/.well-known/mercure?topic=gauge-{i}")
            assert (await client.head(10.0)).status == 200
            subs.append(client)
        name = 'sseserver_open_streams{kind="subscription"}'
        try:
            for _ in range(6):
                assert await _metrics_sample(sup.port, name) == 20
                assert await _metrics_sample(sup.port, "sseserver_open_connections") >= 21
        finally:
            for client in subs:
                await client.close()
        for _ in range(200):  # bounded: each worker learns of the closes from the kernel
            if await _metrics_sample(sup.port, name) == 0:
                break
            await asyncio.sleep(0.02)
        assert await _metrics_sample(sup.port, name) == 0

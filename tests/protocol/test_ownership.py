"""A generation belongs to the subject that started it (SPEC §9), over real sockets.

With JWT on, watching (``GET /v1/streams/{id}``), resuming (``Last-Event-ID`` on
``/v1/stream``) and cancelling need the same subject, or a token whose subscribe claim
covers the generation's topic ``streams/{id}``. Anyone else is answered exactly as for
an id that never existed: 404 for watch and cancel, and for a resume, the new generation
that a reconnect naming an unknown generation gets. No answer tells them it exists.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from tests.support.jwt_keys import bearer
from tests.support.rawhttp import RawClient, Response, open_stream, start_generation
from tests.support.servers import app_server

pytestmark = pytest.mark.timeout(60)

SECRET = "ownership-test-secret-long-enough-for-hs256!"
LONG = "/v1/stream?tokens=100000&interval_ms=20"


def token(sub: str | None, subscribe: list[str] | None = None) -> str:
    claims: dict[str, Any] = {}
    if sub is not None:
        claims["sub"] = sub
    if subscribe is not None:
        claims["mercure"] = {"subscribe": subscribe}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def call(port: int, method: str, target: str, tok: str, extra: Any = ()) -> Response:
    async with await RawClient.connect(port) as client:
        client.request(method, target, [*bearer(tok), *extra])
        return await client.response()


def comparable(resp: Response) -> tuple[int, Any]:
    """What a caller learns from a refusal (the request id aside)."""
    return resp.status, json.loads(resp.body)


async def test_only_the_owner_or_a_covering_claim_may_watch_resume_or_cancel() -> None:
    alice, bob = token("alice"), token("bob")
    async with app_server(jwt_secret=SECRET) as (server, ctx):
        port = server.port
        origin, reader, gen_id = await start_generation(port, LONG, bearer(alice))
        async with origin:
            await reader.until(lambda r: len(r.parser.events) >= 4)
            unknown_watch = comparable(await call(port, "GET", "/v1/streams/nope", bob))
            unknown_cancel = comparable(await call(port, "POST", "/v1/streams/nope/cancel", bob))
            assert unknown_watch[0] == unknown_cancel[0] == 404

            # bob: watching and cancelling alice's generation look like an unknown id.
            watch = await call(port, "GET", f"/v1/streams/{gen_id}", bob)
            assert comparable(watch) == unknown_watch
            cancel = await call(port, "POST", f"/v1/streams/{gen_id}/cancel", bob)
            assert comparable(cancel) == unknown_cancel
            gen = ctx.generations.get(gen_id)
            assert gen is not None and not gen.finished, "bob's cancel stopped it"

            # bob resuming with alice's id gets what an unknown id gets: a generation of
            # his own, never a byte of alice's.
            client, resp, bob_reader = await open_stream(
                port,
                "/v1/stream?tokens=3&interval_ms=0",
                headers=[*bearer(bob), ("Last-Event-ID", f"{gen_id}:2")],
            )
            async with client:
                assert resp.status == 200
                events = await bob_reader.rest()
            assert events[0].type == "start"
            assert json.loads(events[0].data)["id"] != gen_id
            assert not any(e.last_event_id.startswith(f"{gen_id}:") for e in events)
            assert ctx.generations.get(gen_id) is not None  # alice's runs on

            # Tokens whose subscribe claim covers streams/{id} may watch (shared on purpose);
            # one covering another topic may not.
            for allowed in (
                token("carol", [f"streams/{gen_id}"]),
                token("dave", ["*"]),
                token("erin", ["streams/{id}"]),
                token(None, [f"streams/{gen_id}"]),
            ):
                client, resp, viewer = await open_stream(
                    port, f"/v1/streams/{gen_id}", headers=bearer(allowed)
                )
                async with client:
                    assert resp.status == 200
                    assert (await viewer.next()).type == "start"
            other = token("frank", ["streams/another"])
            assert comparable(await call(port, "GET", f"/v1/streams/{gen_id}", other)) == (
                unknown_watch
            )
            # A token without a subject owns nothing it starts after the fact either.
            assert (await call(port, "GET", f"/v1/streams/{gen_id}", token(None))).status == 404

            # alice: watch, resume and cancel her own.
            client, resp, own = await open_stream(
                port, f"/v1/streams/{gen_id}", headers=bearer(alice)
            )
            async with client:
                assert resp.status == 200
                assert (await own.next()).type == "start"
            client, resp, resumed = await open_stream(
                port, LONG, headers=[*bearer(alice), ("Last-Event-ID", f"{gen_id}:2")]
            )
            async with client:
                assert resp.status == 200
                assert (await resumed.next()).last_event_id == f"{gen_id}:3"
            cancelled = await call(port, "POST", f"/v1/streams/{gen_id}/cancel", alice)
            assert cancelled.status == 200
            assert json.loads(cancelled.body) == {"id": gen_id, "cancelled": True}
            rest = await reader.rest()
        assert [json.loads(e.data)["code"] for e in rest if e.type == "error"] == ["cancelled"]


async def test_without_auth_a_generation_id_is_enough() -> None:
    """Auth off: the id is the capability (watch links work as before)."""
    async with app_server() as (server, _ctx):
        client, resp, reader = await open_stream(server.port, LONG)
        async with client:
            gen_id = json.loads((await reader.next()).data)["id"]
            watcher, resp, viewer = await open_stream(server.port, f"/v1/streams/{gen_id}")
            async with watcher:
                assert resp.status == 200
                assert (await viewer.next()).type == "start"

"""A real ``EventSource`` in headless Chromium subscribing to the Mercure hub through both
protocols (SPEC §8, §11): the classic one (``topic=``, a classic token in
``mercureAuthorization``, ``lastEventID``) and draft-dunglas-mercure-08 (``match`` /
``match_urlpattern``, an ``at+jwt`` token in the ``__Secure-mercure_access_token``
cookie, ``last_event_id``), with publishers of the other protocol, private updates only
where the token covers them, and ``--anonymous`` subscribers without any token.

The page is one of the hub's own origin, so the cookies reach the hub as they would for
a same-site deployment; Chromium treats ``127.0.0.1`` as a secure context, where
``__Secure-`` cookies are allowed over plain HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest

from tests.protocol.test_mercure import BOOK1, BOOK2, SECRET
from tests.protocol.test_mercure import token as classic_token
from tests.protocol.test_mercure_draft import access_token, detail, post
from tests.support.browser import chromium
from tests.support.servers import app_server

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/.well-known/mercure"
BOOKS = "https://example.com/books/:id"

OPEN = """([url, name]) => new Promise((resolve, reject) => {
    window.got = window.got || {};
    const got = window.got[name] = [];
    const es = new EventSource(url);
    (window.sources = window.sources || {})[name] = es;
    es.onmessage = (e) => got.push([e.lastEventId, e.data]);
    es.onopen = () => resolve(true);
    es.onerror = () => { if (es.readyState === EventSource.CLOSED) reject(new Error('closed')); };
})"""


async def _page(browser: BrowserContext, port: int) -> Page:
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{port}/healthz")  # any page of the hub's origin
    return page


async def _open(page: Page, name: str, query: list[tuple[str, str]]) -> None:
    assert await page.evaluate(OPEN, [f"{PATH}?{urlencode(query)}", name]) is True


async def _got(page: Page, name: str, last_id: str) -> list[list[str]]:
    await page.wait_for_function(
        "([name, id]) => (window.got[name] || []).some((e) => e[0] === id)", arg=[name, last_id]
    )
    got: list[list[str]] = await page.evaluate("(name) => window.got[name]", name)
    return got


async def _cookie(browser: BrowserContext, name: str, value: str) -> None:
    await browser.clear_cookies()
    cookie: Any = {
        "name": name,
        "value": value,
        "domain": "127.0.0.1",  # cookies are per host, not per port
        "path": PATH,  # draft-08 §4.1.2: the path of the hub's URL
        "httpOnly": True,
        "secure": name.startswith("__Secure-"),
        "sameSite": "Strict",
    }
    await browser.add_cookies([cookie])


async def _publish(port: int, token: str, topic: str, id_: str, *, private: bool = False) -> None:
    fields = [("topic", topic), ("data", f"data of {id_}"), ("id", id_)]
    resp = await post(port, [*fields, *([("private", "on")] if private else [])], token)
    assert resp.status == 200, resp.body


async def test_eventsource_through_both_protocols(tmp_path: Path) -> None:
    draft_pub = access_token(detail(["publish"], "*"))
    classic_pub = classic_token(publish=["*"])
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        port = server.port
        hub = f"http://127.0.0.1:{port}/.well-known/mercure"  # the Host the browser sends
        async with chromium(tmp_path / "profile") as browser:
            page = await _page(browser, port)

            # Classic: topic=, the mercureAuthorization cookie; a draft-08 publisher.
            await _cookie(browser, "mercureAuthorization", classic_token(subscribe=[BOOK1]))
            await _open(page, "classic", [("topic", BOOK1)])
            await _publish(port, draft_pub, BOOK1, "d-public")
            await _publish(port, draft_pub, BOOK1, "d-private", private=True)
            await _publish(port, draft_pub, BOOK2, "d-other")
            got = await _got(page, "classic", "d-private")
            assert got == [["d-public", "data of d-public"], ["d-private", "data of d-private"]]

            # Draft-08: a URL Pattern, the __Secure- cookie, replay by last_event_id; a
            # classic publisher. Its token covers BOOK1 only: BOOK2's private update is
            # routed to it but never delivered.
            token = access_token(detail(["subscribe"], BOOK1), aud=hub)
            await _cookie(browser, "__Secure-mercure_access_token", token)
            await _open(page, "draft", [("match_urlpattern", BOOKS), ("last_event_id", "d-public")])
            await _publish(port, classic_pub, BOOK2, "c-private-2", private=True)
            await _publish(port, classic_pub, BOOK1, "c-private-1", private=True)
            await _publish(port, classic_pub, BOOK2, "c-public-2")
            got = await _got(page, "draft", "c-public-2")
            assert [e[0] for e in got] == [
                "d-private",
                "d-other",
                "c-private-1",
                "c-public-2",
            ]
            got = await _got(page, "classic", "c-private-1")
            assert [e[0] for e in got] == ["d-public", "d-private", "c-private-1"]


async def test_eventsource_anonymous_subscribers(tmp_path: Path) -> None:
    """``--anonymous``: with JWT on, an EventSource without any token gets the public
    updates (either protocol), never the private ones."""
    publisher = access_token(detail(["publish"], "*"))
    async with app_server(jwt_secret=SECRET, anonymous=True) as (server, _ctx):
        port = server.port
        async with chromium(tmp_path / "profile") as browser:
            page = await _page(browser, port)
            await _open(page, "classic", [("topic", BOOK1)])
            await _open(page, "draft", [("match", BOOK1)])
            await _publish(port, publisher, BOOK1, "secret", private=True)
            await _publish(port, publisher, BOOK1, "news")
            for name in ("classic", "draft"):
                assert await _got(page, name, "news") == [["news", "data of news"]]

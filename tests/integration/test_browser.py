"""The demo page in real headless Chromium, with its real ``EventSource`` (SPEC §6, §8, §11).

The synthetic provider's text is deterministic, so what the page shows is compared with
the exact uninterrupted answer: token by token while streaming, after Stop, after the
server side of the stream was torn down mid-answer (resume by ``Last-Event-ID``), and in
a second page watching the same generation.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from sseserver.generations import parse_event_id
from tests.support.browser import (
    ARTIFACTS,
    answer,
    ask,
    chromium,
    count_starts,
    demo_hooks,
    js_errors,
    open_demo,
    sample_answer,
    state,
    states_seen,
    stream_connections,
    wait_for_state,
)
from tests.support.servers import app_server
from tests.support.synthetic import expected_text
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _number(text: str | None) -> float:
    assert text is not None
    try:
        return float(text)
    except ValueError:
        raise AssertionError(f"not a number: {text!r}") from None


async def test_answer_streams_token_by_token(tmp_path: Path) -> None:
    tokens = 60
    full = expected_text(tokens)
    async with app_server() as (server, ctx), chromium(tmp_path / "profile") as browser:
        started = count_starts(ctx)
        page = await open_demo(browser, server.port, f"?tokens={tokens}&interval_ms=40")
        assert await page.input_value("#provider") == "synthetic"
        assert await page.input_value("#model") == "synthetic-1"
        assert await state(page) == "idle"

        await ask(page, "How do server-sent events work?")
        samples = await sample_answer(page, every_ms=150)

        final = samples[-1]
        assert final["state"] == "done", samples[-3:]
        assert final["text"] == full
        assert await answer(page) == full
        # Every moment showed a prefix of the answer, and it grew while streaming.
        for s in samples:
            assert full.startswith(s["text"]), s
        streaming = [s for s in samples if s["state"] == "streaming" and s["text"]]
        lengths = [len(s["text"]) for s in streaming]
        assert len(set(lengths)) >= 5, f"too few distinct lengths before done: {lengths}"
        assert all(a < b for a, b in itertools.pairwise(lengths)), (
            f"#answer did not grow at every sample while streaming: {lengths}"
        )
        assert lengths[0] < len(full) // 2, f"the first text shown was already {lengths[0]} chars"
        assert "streaming" in await states_seen(page)

        ttft = _number(await page.text_content("#ttft"))
        tps = _number(await page.text_content("#tps"))
        assert 0 <= ttft < 5000
        assert 10 < tps < 100, tps  # 60 tokens, one per 40 ms: ~25 tokens/s
        assert await page.is_enabled("#send")
        assert not await page.is_enabled("#stop")

        hooks = await demo_hooks(page)
        assert hooks["state"] == "done"
        assert hooks["generationId"] == started[0]
        assert hooks["reconnects"] == 0
        # start (0) + 60 tokens + metrics + [DONE]
        assert hooks["lastSeq"] == tokens + 2
        assert started == [hooks["generationId"]]
        gen = ctx.generations.get(started[0])
        assert gen is not None and gen.finished and gen.error_code is None
        assert gen.tokens == tokens

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
        assert js_errors(page) == []


async def test_stop_cancels_the_generation(tmp_path: Path) -> None:
    tokens = 2000
    async with app_server() as (server, ctx), chromium(tmp_path / "profile") as browser:
        started = count_starts(ctx)
        page = await open_demo(browser, server.port, f"?tokens={tokens}&interval_ms=20")
        await ask(page, "Tell me a long story.")
        await page.wait_for_function("document.getElementById('answer').textContent.length > 40")
        assert await state(page) == "streaming"
        gen_id = (await demo_hooks(page))["generationId"]
        assert started == [gen_id]
        gen = ctx.generations.get(gen_id)
        assert gen is not None and not gen.finished

        await page.click("#stop")
        assert await wait_for_state(page, "stopped", "done", "error") == "stopped"
        await eventually(lambda: gen.finished, 5.0, "the generation ends after Stop")
        assert gen.error_code == "cancelled"  # the page's cancel, not an abandoned stream
        await eventually(lambda: gen.finished and gen.feed is None, 2.0, "the generation stopped")
        assert gen.tokens < tokens
        produced = gen.tokens

        shown = await answer(page)
        await asyncio.sleep(0.6)  # 30 tokens' worth
        assert await answer(page) == shown, "text kept growing after Stop"
        assert expected_text(tokens).startswith(shown)
        assert await state(page) == "stopped"
        assert gen.tokens == produced, "the provider kept producing after Stop"
        assert stream_connections(server) == []
        assert await page.is_enabled("#send")
        assert not await page.is_enabled("#stop")
        assert started == [gen_id]
        assert js_errors(page) == []


async def test_resume_after_server_side_drop(tmp_path: Path) -> None:
    tokens = 150
    full = expected_text(tokens)
    async with (
        app_server(resume_grace_s=5, retry_ms=1000) as (server, ctx),
        chromium(tmp_path / "profile") as browser,
    ):
        started = count_starts(ctx)
        page = await open_demo(browser, server.port, f"?tokens={tokens}&interval_ms=30")
        await ask(page, "Survive a dropped connection.")
        await page.wait_for_function("(window.sseDemo.lastSeq ?? 0) >= 20")
        gen_id = (await demo_hooks(page))["generationId"]
        gen = ctx.generations.get(gen_id)
        assert gen is not None and not gen.finished

        conns = stream_connections(server)
        assert len(conns) == 1, f"expected the page's one /v1/stream connection: {conns}"
        before = await answer(page)
        assert conns[0].transport is not None
        conns[0].transport.abort()

        await wait_for_state(page, "reconnecting", "done", "error", timeout_s=5)
        assert await state(page) == "reconnecting", await states_seen(page)
        assert not gen.finished, "the generation did not survive the drop (resume_grace_s)"
        assert await wait_for_state(page, "done", "error", "stopped", timeout_s=30) == "done"

        text = await answer(page)
        assert text.startswith(before)
        assert text == full, "resumed text differs from the uninterrupted answer"
        seen = await states_seen(page)
        assert "reconnecting" in seen, seen
        after = seen[seen.index("reconnecting") + 1 :]
        assert after[:1] == ["streaming"] and after[-1] == "done", seen
        hooks = await demo_hooks(page)
        assert hooks["reconnects"] >= 1
        assert hooks["generationId"] == gen_id
        assert started == [gen_id], f"a reconnect started a new generation: {started}"
        assert gen.finished and gen.error_code is None and gen.tokens == tokens
        last = parse_event_id(f"{gen_id}:{hooks['lastSeq']}")
        assert last == (gen_id, gen.last_seq)
        assert js_errors(page) == []


async def test_watch_page_shows_the_same_answer(tmp_path: Path) -> None:
    tokens = 100
    full = expected_text(tokens)
    async with app_server() as (server, ctx), chromium(tmp_path / "profile") as browser:
        started = count_starts(ctx)
        page = await open_demo(browser, server.port, f"?tokens={tokens}&interval_ms=30")
        await ask(page, "Who else is watching?")
        await page.wait_for_function("document.getElementById('answer').textContent.length > 0")
        gen_id = (await demo_hooks(page))["generationId"]
        assert gen_id
        link = await page.get_attribute("#watch", "href")
        assert link is not None and f"watch={gen_id}" in link
        gen = ctx.generations.get(gen_id)
        assert gen is not None and not gen.finished

        watcher = await open_demo(browser, server.port, f"?watch={gen_id}")
        assert not gen.finished, "the stream ended before the watcher joined; slow it down"
        assert await watcher.is_hidden("#composer")

        assert await wait_for_state(page, "done", "error", "stopped") == "done"
        assert await wait_for_state(watcher, "done", "error", "stopped") == "done"
        assert await answer(page) == full
        assert await answer(watcher) == full
        assert (await demo_hooks(watcher))["generationId"] == gen_id
        assert started == [gen_id], "watching started an upstream call of its own"
        assert js_errors(page) == [] and js_errors(watcher) == []

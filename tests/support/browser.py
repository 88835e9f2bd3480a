"""Headless Debian Chromium driven by Playwright (async API), and what the demo page tests
read of the page and of the in-process server (SPEC §6, §8, §11; the server itself is
``tests.support.servers.app_server``).

Playwright's bundled browsers are never downloaded: the system ``/usr/bin/chromium`` is
launched with a fresh profile. A missing browser or Playwright skips outside CI and
fails under ``CI=true`` (``tests.support.requirements.require``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from sseserver.http.protocol import HTTPProtocol
from sseserver.http.server import Server
from sseserver.web.context import Context
from tests.support.procs import ROOT
from tests.support.requirements import require, require_binary

try:
    from playwright.async_api import async_playwright

    PLAYWRIGHT_MISSING = ""
except ImportError as exc:  # pragma: no cover - depends on the environment
    PLAYWRIGHT_MISSING = str(exc)

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

ARTIFACTS = ROOT / "tests" / "artifacts"  # the demo page's screenshot

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TERMINAL_STATES = ("done", "stopped", "error")


@asynccontextmanager
async def chromium(profile_dir: Path) -> AsyncIterator[BrowserContext]:
    """A headless system Chromium with a fresh profile in ``profile_dir``."""
    executable = require_binary("chromium")
    require("playwright", not PLAYWRIGHT_MISSING, f"pip install playwright ({PLAYWRIGHT_MISSING})")
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 900, "height": 760},
        )
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            await context.close()


def count_starts(ctx: Context) -> list[str]:
    """Record the id of every generation started from now on (the upstream calls)."""
    started: list[str] = []
    generations = ctx.generations
    original = generations.start

    def start(*args: Any, **kwargs: Any) -> Any:
        gen = original(*args, **kwargs)
        started.append(gen.id)
        return gen

    generations.start = start  # type: ignore[method-assign]
    return started


def stream_connections(server: Server, path: str = "/v1/stream") -> list[HTTPProtocol]:
    """Open connections whose current response is a stream on ``path``."""
    return [
        conn
        for conn in server.state.connections
        if conn._stream is not None
        and conn._stream.request.path == path
        and conn.transport is not None
    ]


# -- the page ---------------------------------------------------------------------------

_JS_ERRORS: WeakKeyDictionary[Page, list[str]] = WeakKeyDictionary()

# Every value body[data-state] takes, in order, from the moment it is installed.
RECORD_STATES = """() => {
  window.__states = [document.body.dataset.state];
  new MutationObserver(() => {
    const s = document.body.dataset.state;
    if (window.__states[window.__states.length - 1] !== s) window.__states.push(s);
  }).observe(document.body, { attributes: true, attributeFilter: ['data-state'] });
}"""


async def open_demo(context: BrowserContext, port: int, query: str = "") -> Page:
    """Open the demo page; for the composer (not a watcher) wait for the provider list."""
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    _JS_ERRORS[page] = errors
    await page.goto(f"http://127.0.0.1:{port}/{query}")
    if "watch=" not in query:
        await page.wait_for_function("document.getElementById('provider').options.length > 0")
    await page.evaluate(RECORD_STATES)
    return page


def js_errors(page: Page) -> list[str]:
    """Uncaught exceptions of the page's scripts so far."""
    return list(_JS_ERRORS.get(page, ()))


async def ask(page: Page, question: str) -> None:
    """Type ``question`` and press Send."""
    await page.fill("#prompt", question)
    await page.click("#send")


async def state(page: Page) -> str:
    return str(await page.evaluate("document.body.dataset.state"))


async def states_seen(page: Page) -> list[str]:
    return list(await page.evaluate("window.__states"))


async def answer(page: Page) -> str:
    return str(await page.evaluate("document.getElementById('answer').textContent"))


async def demo_hooks(page: Page) -> dict[str, Any]:
    return dict(await page.evaluate("({...window.sseDemo})"))


async def wait_for_state(page: Page, *states: str, timeout_s: float = 20.0) -> str:
    await page.wait_for_function(
        "(states) => states.includes(document.body.dataset.state)",
        arg=list(states),
        timeout=timeout_s * 1000,
    )
    return await state(page)


SAMPLER = """async (everyMs) => {
  const samples = [];
  const t0 = performance.now();
  for (;;) {
    const s = document.body.dataset.state;
    samples.push({ t: performance.now() - t0, state: s,
                   text: document.getElementById('answer').textContent });
    if (['done', 'stopped', 'error'].includes(s) || performance.now() - t0 > 30000) {
      return samples;
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}"""


async def sample_answer(page: Page, every_ms: int) -> list[dict[str, Any]]:
    """Sample (ms since start, state, #answer text) in the page every ``every_ms`` until
    the turn ends."""
    return list(await page.evaluate(SAMPLER, every_ms))

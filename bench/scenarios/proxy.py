"""Proxy: the relay of issue 12 on the production path, side by side with a plain aiohttp
relay — per row (route, provider, client) the TTFT it adds over the upstream's own, and the
concurrent 50 chunk/s streams it holds (the capacity rule of ``tokens``) with the server's
CPU per relayed chunk.

Rows of sseserver (``ROWS["sseserver"]``), each against a fake upstream:
- ``stream-openai-{sdk,lean}``: ``GET /v1/stream?provider=openai`` (sseserver's own events);
- ``chat-openai-{sdk,lean}``: ``POST /v1/chat/completions`` with ``"stream": true``, the
  upstream's ``chat.completion.chunk`` events relayed as they came;
- ``stream-gemini-{sdk,lean}``: ``GET /v1/stream?provider=gemini`` (Gemini's
  ``streamGenerateContent?alt=sse``).
``sdk``/``lean`` is the ``--openai-client`` / ``--gemini-client`` of the server.

The peer (``ROWS["aiohttp-relay"]``): ``chat-openai-aiohttp``, bench/peers/aiohttp_relay.py
under the load of the ``chat-openai-*`` rows; RESULTS.md gives every row's ratio to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.harness import NODE, PY, RESULTS, ROOT, http_get, http_post
from bench.servers import Server, Upstream, _pkg_version
from bench.session import Bench, _main_cpu
from bench.settings import (
    DELIVERED_SHARE,
    FIRST_EVENT_BOUND_MS,
    GEMINI_CLIENTS,
    LATENESS_BOUND_MS,
    OPENAI_CLIENTS,
)

MODELS = {"openai": "gpt-4o-mini", "gemini": "gemini-2.5-flash"}
KEYS = {"openai": {"OPENAI_API_KEY": "sk-fake"}, "gemini": {"GEMINI_API_KEY": "fake"}}
SDK_PACKAGES = {"openai": "openai", "gemini": "google-genai"}
PEER_CLIENT = "aiohttp"  # the client of the relay peer's row
ROUTES = {"stream": "/v1/stream", "chat": "/v1/chat/completions"}
# What tells a text event and a stream's first event, per route (loadgen --marker and
# --start-marker): sseserver's own events, or a relayed OpenAI stream (the role chunk first,
# then one chat.completion.chunk per content delta `tok{i} `).
TEXT_MARKER = '{"text"'
CHUNK_MARKER = '"content":"tok'
GEMINI_MARKER = '"text":"tok'


@dataclasses.dataclass(frozen=True)
class Row:
    """One relay path: ``route`` (``stream``: /v1/stream, ``chat``: /v1/chat/completions),
    ``provider`` (``openai``, ``gemini``), ``client`` (sseserver's ``--{provider}-client``,
    or ``aiohttp`` for the relay peer)."""

    route: str
    provider: str
    client: str

    @property
    def name(self) -> str:
        """``chat-openai-lean``: what ``--proxy-rows`` picks, and profile file names."""
        return f"{self.route}-{self.provider}-{self.client}"

    @property
    def path(self) -> str:
        return ROUTES[self.route]

    def variant(self, part: str) -> str:
        """The record's variant: ``ttft chat openai lean``, ``50/s stream gemini sdk``."""
        return f"{'50/s' if part == 'streams' else part} {self.route} {self.provider} {self.client}"

    def fields(self) -> dict[str, str]:
        return {
            "row": self.name,
            "route": self.path,
            "provider": self.provider,
            "client": self.client,
        }

    def request(self, directive: str) -> tuple[str, str]:
        """(target, JSON body or '') of one request through this row's route whose fake
        upstream answers ``directive`` (``tokens=200 interval_ms=20``)."""
        prompt = f"hi [fake {directive}]"
        if self.route == "stream":
            q = quote(prompt, safe="")
            return f"/v1/stream?provider={self.provider}&model={MODELS[self.provider]}&q={q}", ""
        body = {
            "model": MODELS[self.provider],
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        if self.provider != "openai":
            body["provider"] = self.provider
        return self.path, json.dumps(body, separators=(",", ":"))

    @property
    def markers(self) -> tuple[str, str]:
        """(text event, first event) of this row's answers."""
        if self.route == "stream":
            return TEXT_MARKER, "event: start"
        return CHUNK_MARKER, "data: "

    def direct(self, directive: str) -> tuple[str, str, str]:
        """(target, body, text marker) of the same request sent to the upstream itself:
        the upstream's own TTFT, which the server's is compared with."""
        prompt = f"hi [fake {directive}]"
        if self.provider == "gemini":
            body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
            target = f"/v1beta/models/{MODELS['gemini']}:streamGenerateContent?alt=sse"
            return target, json.dumps(body, separators=(",", ":")), GEMINI_MARKER
        body = {
            "model": MODELS["openai"],
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        return "/v1/chat/completions", json.dumps(body, separators=(",", ":")), CHUNK_MARKER


ROWS: dict[str, tuple[Row, ...]] = {
    "sseserver": (
        *(Row("stream", "openai", c) for c in OPENAI_CLIENTS),
        *(Row("chat", "openai", c) for c in OPENAI_CLIENTS),
        *(Row("stream", "gemini", c) for c in GEMINI_CLIENTS),
    ),
    "aiohttp-relay": (Row("chat", "openai", PEER_CLIENT),),
}
ALL_ROWS = tuple(r.name for rows in ROWS.values() for r in rows)
# The row every other row's ratio is taken against (RESULTS.md), and its server.
PEER_ROW = ("aiohttp-relay", f"chat-openai-{PEER_CLIENT}")


def pick_rows(patterns: tuple[str, ...]) -> list[str]:
    """The row names matching any of ``patterns`` (shell-style: ``chat-*``); every row
    when there are none."""
    if not patterns:
        return list(ALL_ROWS)
    return [r for r in ALL_ROWS if any(fnmatch.fnmatchcase(r, p) for p in patterns)]


@contextlib.contextmanager
def proxied(
    bench: Bench, name: str, row: Row | None = None, upstream: str = "python"
) -> Iterator[tuple[Server, Upstream]]:
    """Server ``name`` relaying to a fake upstream of ``row.provider`` (``python``: the
    tests' fake, ``node``: bench/peers/{provider}_upstream.js), warmed up through the row.
    ``row`` None: sseserver's OpenAI provider with its default client (cancel)."""
    row = row or Row("stream", "openai", "")
    up = Upstream(upstream, api=row.provider)
    try:
        if row.client == PEER_CLIENT:
            args = ["--upstream", up.base_url]
        else:
            # --provider: the default provider, the one a plain OpenAI-style body (no
            # "provider", a model without a "provider/" prefix) reaches on the chat route
            args = ["--provider", row.provider, f"--{row.provider}-base-url", up.base_url]
            flag = client_arg(row)[0] if row.client else None
            if flag is not None:
                args += [f"--{row.provider}-client", flag]
        with bench.server(name, args, KEYS[row.provider]) as srv:
            warm_up(srv, row, upstream)
            yield srv, up
    finally:
        up.stop()


def warm_up(srv: Server, row: Row, upstream: str) -> None:
    """A few short answers through ``row``: the client and its pool warm up, and a row
    that relays nothing fails here, with what it answered."""
    target, body = row.request("tokens=2")
    for _ in range(3):
        if body:
            _, raw = http_post(srv.port, target, body.encode(), accept="text/event-stream")
        else:
            _, raw = http_get(srv.port, target, accept="text/event-stream")
        if b"tok1 " not in raw:
            raise RuntimeError(
                f"no text through {row.name} ({upstream} upstream): "
                f"{raw[-300:].decode(errors='replace')!r}"
            )


def run(bench: Bench, name: str) -> None:
    """Every row of ``name`` picked by ``--proxy-rows``, each part of ``--proxy-parts``:
    the TTFT it adds (against the tests' fake upstream) and the concurrent 50 chunk/s
    streams it holds (against the Node upstream), with server CPU per chunk."""
    s = bench.settings
    picked = set(pick_rows(s.proxy_rows))
    for row in ROWS.get(name, ()):
        if row.name not in picked:
            continue
        why = client_arg(row)[1] if row.client != PEER_CLIENT else None
        for part, measure in (("ttft", proxy_ttft), ("streams", proxy_streams)):
            if part not in s.proxy_parts:
                continue
            variant = row.variant(part)
            if why:
                bench.say(f"{name} proxy {variant}: skipped ({why})")
                bench.record("proxy", variant, name, {**row.fields()}, skipped=why)
                continue
            try:
                measure(bench, name, row, variant)
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
                bench.say(f"{name} proxy {variant}: ERROR {exc}")
                bench.record("proxy", variant, name, {**row.fields()}, error=str(exc)[:500])


def proxy_ttft(bench: Bench, name: str, row: Row, variant: str) -> None:
    """TTFT through ``row`` against the tests' fake upstream, next to that upstream's own
    TTFT measured directly: the difference is what the server adds (on a fresh connection
    to the server each time, and on one kept alive)."""
    why = prerequisites("python", row)
    if why:
        bench.record("proxy", variant, name, {**row.fields()}, skipped=why)
        return
    n = max(50, bench.settings.ttft_requests // 3)
    bench.say(f"{name} proxy {variant}: {n} requests via {row.name} and {n} direct")
    target, body = row.request("tokens=1")
    marker = row.markers[0]
    d_target, d_body, d_marker = row.direct("tokens=1")
    profile = f"proxy_ttft_{row.name}" if bench.profile and name == "sseserver" else ""

    def attempt() -> dict[str, Any]:
        with proxied(bench, name, row) as (srv, up):
            via = bench.loadgen(
                srv,
                "ttft",
                [
                    *("--requests", n, "--target", target, "--marker", marker),
                    *(("--body", body) if body else ()),
                    # on the generator's core: its CPU is measured, not taken for noise
                    *("--upstream-pid", up.pid),
                ],
                timeout_s=300,
                profile_as=profile,
            )
            direct = bench.loadgen(
                srv,
                "ttft",
                [
                    *("--requests", n, "--target", d_target),
                    *("--body", d_body, "--marker", d_marker),
                ],
                timeout_s=300,
                port=up.port,
                pid=up.pid,
            )
        out: dict[str, Any] = {
            **row.fields(),
            "via": via,
            "direct": direct,
            "cpu": via.get("cpu_keepalive"),
        }
        for kind in ("fresh_ms", "keepalive_ms"):
            for p in ("p50", "p99"):
                v, d = via[kind].get(p), direct[kind].get(p)
                if v is not None and d is not None:
                    out[f"added_{kind[:-3]}_{p}_ms"] = round(v - d, 3)
        return out

    r = bench.measure(f"{name} proxy {variant}", attempt, lambda r: False, profiled=bool(profile))
    bench.say(
        f"{name} proxy {variant}: fresh-connection TTFT p50 {r['via']['fresh_ms'].get('p50')} "
        f"ms via {row.name} vs {r['direct']['fresh_ms'].get('p50')} ms direct (added p50 "
        f"{r.get('added_fresh_p50_ms')} ms, p99 {r.get('added_fresh_p99_ms')} ms); keep-alive "
        f"added p50 {r.get('added_keepalive_p50_ms')} ms, p99 {r.get('added_keepalive_p99_ms')}"
        f" ms; errors {r['via']['errors']} / {r['direct']['errors']}"
    )
    bench.record("proxy", variant, name, r, profiled=bool(profile))


def proxy_streams(bench: Bench, name: str, row: Row, variant: str) -> None:
    """Concurrent 50 chunk/s streams through ``row`` against the Node upstream (pinned to
    core 1 next to the load generator), ramped like ``tokens`` (requests spread over
    ``proxy_ramp_s``): the largest count held, server CPU per chunk, and with ``--profile``
    a py-spy profile of the count held (run once more under py-spy, after the ramp)."""
    why = prerequisites("node", row)
    if why:
        bench.record("proxy", variant, name, {**row.fields()}, skipped=why)
        return
    s = bench.settings
    tokens = s.proxy_tokens
    target, body = row.request(f"tokens={tokens} interval_ms=20")
    marker, start = row.markers
    steps: list[dict[str, Any]] = []

    def run_step(n: int, profile_as: str = "") -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            with proxied(bench, name, row, "node") as (srv, up):
                r = bench.loadgen(
                    srv,
                    "tokens",
                    [
                        *("--streams", n, "--tokens", tokens, "--interval-ms", 20),
                        *("--ramp-s", s.proxy_ramp_s, "--target", target),
                        *(("--body", body) if body else ()),
                        *("--marker", marker, "--start-marker", start),
                        *("--upstream-pid", up.pid),
                    ],
                    timeout_s=120 + tokens * 0.02 + s.proxy_ramp_s + n / 100,
                    profile_as=profile_as,
                )
            return _per_chunk(r)

        return bench.lateness_step(
            f"{name} proxy {row.name} x{n}" + (" under py-spy" if profile_as else ""),
            attempt,
            profiled=bool(profile_as),
            extra=lambda r: (
                f"; steady window: server {(_main_cpu(r) or {}).get('server_util', 0):.0%},"
                f" upstream {(_main_cpu(r) or {}).get('upstream_util', 0):.0%} cpu (core 1),"
                f" server {r.get('server_cpu_us_per_chunk')} µs cpu per chunk"
            ),
        )

    def step(n: int) -> bool:
        bench.say(
            f"{name} proxy {row.name}: {n} streams x {tokens} chunks at 50/s through "
            f"{row.path} ({row.provider}, {row.client}; Node upstream), opened over "
            f"{s.proxy_ramp_s:g} s"
        )
        r = run_step(n)
        steps.append(r)
        return bool(r["held"])

    held, failed_at = bench.ramp(s.proxy_steps, s.proxy_bisect, 25, step)
    at_held = next((r for r in steps if r["streams"] == held and r["held"]), None)
    at_fail = next((r for r in steps if r["streams"] == failed_at), None)
    # CPU per chunk at the count held, else at the smallest count tried.
    basis = at_held or min(steps, key=lambda r: r["streams"], default=None)
    cpu_held = _main_cpu(at_held) if at_held else None
    cpu_fail = _main_cpu(at_fail) if at_fail else None
    profile = None
    if bench.profile and name == "sseserver" and basis is not None:
        profile = proxy_profile(bench, row, basis, run_step)
    metrics = {
        **row.fields(),
        "client_option": row.client != PEER_CLIENT and client_option(row.provider),
        "upstream": f"bench/peers/{row.provider}_upstream.js (Node), pinned to core 1 next "
        "to the load generator (its CPU: upstream_util)",
        "max_streams_held": held,
        "failed_at": failed_at or None,
        "p99_ms_at_held": at_held["steady_lateness_ms"].get("p99") if at_held else None,
        "p99_ms_at_held_incl_opening": at_held["lateness_ms"].get("p99") if at_held else None,
        "events_per_s_at_held": at_held["delivered_events_per_s"] if at_held else None,
        "offered_events_per_s_at_held": (at_held["offered_events_per_s"] if at_held else None),
        "first_event_p99_ms_at_held": (at_held["first_event_ms"].get("p99") if at_held else None),
        "delivered_share_at_held": at_held["delivered_share"] if at_held else None,
        "server_cpu_us_per_chunk": basis.get("server_cpu_us_per_chunk") if basis else None,
        "server_cpu_us_per_chunk_incl_setup": (
            basis.get("server_cpu_us_per_chunk_incl_setup") if basis else None
        ),
        "server_cpu_us_per_chunk_at": basis["streams"] if basis else None,
        "server_cpu_us_per_chunk_at_fail": (
            at_fail.get("server_cpu_us_per_chunk") if at_fail else None
        ),
        "server_util_at_held": cpu_held.get("server_util") if cpu_held else None,
        "gen_util_at_held": cpu_held.get("gen_util") if cpu_held else None,
        "upstream_util_at_held": cpu_held.get("upstream_util") if cpu_held else None,
        "server_util_at_fail": cpu_fail.get("server_util") if cpu_fail else None,
        "gen_util_at_fail": cpu_fail.get("gen_util") if cpu_fail else None,
        "upstream_util_at_fail": cpu_fail.get("upstream_util") if cpu_fail else None,
        "cpu": cpu_held,
        "bound": LATENESS_BOUND_MS,
        "first_event_bound": FIRST_EVENT_BOUND_MS,
        "delivered_share_bound": DELIVERED_SHARE,
        "tokens_per_stream": tokens,
        "ramp_s": s.proxy_ramp_s,
        "steps": steps,
        "profile": profile,
    }
    # The ramp itself ran without py-spy (the profile is a separate run): not profiled.
    bench.record("proxy", variant, name, metrics, profiled=False)


def proxy_profile(
    bench: Bench,
    row: Row,
    basis: dict[str, Any],
    run_step: Callable[[int, str], dict[str, Any]],
) -> dict[str, Any] | None:
    """The ramp's held count (else its smallest) once more, under py-spy: writes
    bench/results/profile_proxy_ROW.txt, headed by that run's CPU per chunk."""
    n = basis["streams"]
    name = f"proxy_{row.name}"
    bench.say(f"proxy {row.name}: {n} streams once more under py-spy")
    try:
        r = run_step(n, name)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        bench.say(f"proxy {row.name}: profiled run failed: {exc}")
        return {"streams": n, "error": str(exc)[:500]}
    cpu = _main_cpu(r) or {}
    out = {
        "streams": n,
        "file": f"bench/results/profile_{name}.txt",
        "held": r["held"],
        "p99_ms": r["steady_lateness_ms"].get("p99"),
        "server_cpu_us_per_chunk": r.get("server_cpu_us_per_chunk"),
        "server_util": cpu.get("server_util"),
    }
    path = RESULTS / f"profile_{name}.txt"
    if path.exists():
        head = (
            f"proxy {row.name} ({row.path}, {row.provider}, --{row.provider}-client "
            f"{row.client}): {n} streams x {r['tokens']} chunks at 50/s against "
            f"bench/peers/{row.provider}_upstream.js; py-spy samples the whole step (the "
            "opening, the steady state, the ends).\n"
            f"This run, under py-spy: server CPU {r.get('server_cpu_us_per_chunk')} µs per "
            f"chunk in the steady window ({cpu.get('server_util', 0):.0%} of core 0), "
            f"steady p99 lateness {out['p99_ms']} ms; without py-spy at this count: "
            f"{basis.get('server_cpu_us_per_chunk')} µs per chunk. A share below times "
            "the µs per chunk is that frame's µs per chunk.\n\n"
        )
        path.write_text(head + path.read_text())
    return out


# /v1/stream through the OpenAI provider, `{}`: the URL-encoded directive (cancel)
OPENAI_Q = "/v1/stream?provider=openai&model=gpt-4o-mini&q=hi%20%5Bfake%20{}%5D"


@functools.cache
def client_option(provider: str) -> bool:
    """Whether this sseserver has ``--{provider}-client`` (``python -m sseserver --help``)."""
    try:
        out = subprocess.run(
            [PY, "-m", "sseserver", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return f"--{provider}-client" in out.stdout


def client_arg(row: Row) -> tuple[str | None, str | None]:
    """(the ``--{provider}-client`` value to pass or None, why ``row`` cannot run or None).
    A server without the option has only the SDK client: ``sdk`` runs without the flag."""
    if client_option(row.provider):
        return row.client, None
    if row.client == "sdk":
        return None, None
    return None, (
        f"sseserver has no --{row.provider}-client option (python -m sseserver --help), so "
        f"no {row.client!r} client: only the SDK path exists"
    )


def _per_chunk(r: dict[str, Any]) -> dict[str, Any]:
    """Add CPU µs per chunk to a loadgen ``tokens`` result through a relay.

    A chunk is one upstream content delta, which is one text event to the client: in the
    steady window (every stream open, none ended) there are no other chunks. The steady
    figure is CPU over that window / text events read in it; ``_incl_setup`` divides the
    whole step's CPU (opening the streams and their upstream requests, the ends) by every
    text event."""
    steady, whole = r.get("cpu_steady") or {}, r.get("cpu") or {}
    n, total = r.get("steady_received") or 0, r.get("received") or 0
    for who in ("server", "upstream"):
        cpu_s = steady.get(f"{who}_cpu_s")
        r[f"{who}_cpu_us_per_chunk"] = round(cpu_s / n * 1e6, 1) if cpu_s and n else None
        cpu_s = whole.get(f"{who}_cpu_s")
        r[f"{who}_cpu_us_per_chunk_incl_setup"] = (
            round(cpu_s / total * 1e6, 1) if cpu_s and total else None
        )
    return r


def prerequisites(upstream: str = "python", row: Row | None = None) -> str | None:
    """None when ``row`` (default: sseserver's OpenAI provider, its default client) can run
    against ``upstream``, else why not."""
    row = row or Row("stream", "openai", "")
    if row.client == "sdk" and _pkg_version(SDK_PACKAGES[row.provider]) == "?":
        return f"needs the {SDK_PACKAGES[row.provider]} package"
    if upstream == "python":
        fake = ROOT / "tests" / "upstreams" / f"{row.provider}_wire.py"
        if not fake.exists():
            return f"needs {fake.relative_to(ROOT)} (the tests' fake {row.provider} upstream)"
    if upstream == "node" and not Path(NODE).exists():
        return f"needs node for bench/peers/{row.provider}_upstream.js (the fast fake upstream)"
    return None

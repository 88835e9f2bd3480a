"""Proxy: through the OpenAI provider against a fake upstream — the TTFT it adds and the
concurrent streams it holds, with server CPU per chunk."""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.harness import NODE, PY, RESULTS, ROOT, http_get
from bench.servers import Server, Upstream, _pkg_version
from bench.session import Bench, _main_cpu
from bench.settings import DELIVERED_SHARE, FIRST_EVENT_BOUND_MS, LATENESS_BOUND_MS, OPENAI_CLIENTS


@contextlib.contextmanager
def proxied(
    bench: Bench, name: str, client: str | None = None, upstream: str = "python"
) -> Iterator[tuple[Server, Upstream]]:
    """sseserver with its OpenAI provider pointed at a fake upstream (``python``: the
    tests' fake, ``node``: bench/peers/openai_upstream.js), warmed up through it.
    ``client``: the ``--openai-client`` to pass (None: the server's only/default one)."""
    up = Upstream(upstream)
    try:
        args = ["--openai-base-url", f"http://127.0.0.1:{up.port}/v1"]
        if client is not None:
            args += ["--openai-client", client]
        with bench.server(name, args, {"OPENAI_API_KEY": "sk-fake"}) as srv:
            for _ in range(3):  # the client and its connection pool warm up
                _, body = http_get(
                    srv.port, OPENAI_Q.format("tokens%3D2"), accept="text/event-stream"
                )
                if b"tok1 " not in body:
                    raise RuntimeError(
                        f"no text through the OpenAI provider ({upstream} upstream): "
                        f"{body[-300:].decode(errors='replace')!r}"
                    )
            yield srv, up
    finally:
        up.stop()


def run(bench: Bench, name: str) -> None:
    """Through the OpenAI provider, for each client (``--openai-client sdk``, ``fast``):
    the TTFT it adds (against the tests' fake upstream) and the concurrent 50 token/s
    streams it holds (against bench/peers/openai_upstream.js), with server CPU per chunk."""
    for client in OPENAI_CLIENTS:
        flag, why = openai_client_arg(client)
        ttft = "openai ttft" if client == "sdk" else f"openai ttft {client}"
        variants = (ttft, f"50/s {client}")
        if why:
            bench.say(f"{name} proxy {client}: skipped ({why})")
            for variant in variants:
                bench.record("proxy", variant, name, None, skipped=why)
            continue
        for variant, part in zip(variants, (proxy_ttft, proxy_streams), strict=True):
            try:
                part(bench, name, client, flag, variant)
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
                bench.say(f"{name} proxy {variant}: ERROR {exc}")
                bench.record("proxy", variant, name, None, error=str(exc)[:500])


def proxy_ttft(bench: Bench, name: str, client: str, flag: str | None, variant: str) -> None:
    """TTFT through the OpenAI provider against the tests' fake upstream, next to the
    upstream's own TTFT measured directly: the difference is what sseserver adds."""
    why = prerequisites("python")
    if why:
        bench.record("proxy", variant, name, None, skipped=why)
        return
    n = max(50, bench.settings.ttft_requests // 3)
    bench.say(f"{name} proxy {variant}: {n} requests via the OpenAI provider and {n} direct")

    def attempt() -> dict[str, Any]:
        with proxied(bench, name, flag) as (srv, up):
            via = bench.loadgen(
                srv,
                "ttft",
                ["--requests", n, "--target", OPENAI_Q.format("tokens%3D1")],
                timeout_s=300,
                profile_as=f"proxy_ttft_{client}" if bench.profile else "",
            )
            direct = bench.loadgen(
                srv,
                "ttft",
                [
                    *("--requests", n, "--target", "/v1/chat/completions"),
                    *("--body", OPENAI_BODY, "--marker", '"content":"tok'),
                ],
                timeout_s=300,
                port=up.port,
                pid=up.pid,
            )
        out: dict[str, Any] = {
            "client": client,
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

    r = bench.measure(f"{name} proxy {variant}", attempt, lambda r: False)
    bench.say(
        f"{name} proxy {variant}: keep-alive TTFT p50 {r['via']['keepalive_ms'].get('p50')} "
        f"ms via sseserver vs {r['direct']['keepalive_ms'].get('p50')} ms direct "
        f"(added p50 {r.get('added_keepalive_p50_ms')} ms, "
        f"p99 {r.get('added_keepalive_p99_ms')} ms)"
    )
    bench.record("proxy", variant, name, r)


def proxy_streams(bench: Bench, name: str, client: str, flag: str | None, variant: str) -> None:
    """Concurrent 50 token/s streams of ``/v1/stream?provider=openai`` against the Node
    upstream (pinned to core 1 next to the load generator), ramped like ``tokens``:
    the largest count held, server CPU per chunk, and with ``--profile`` a py-spy
    profile of the count held (run once more under py-spy, after the ramp)."""
    why = prerequisites("node")
    if why:
        bench.record("proxy", variant, name, None, skipped=why)
        return
    s = bench.settings
    target = OPENAI_Q.format(f"tokens%3D{s.token_count}%20interval_ms%3D20")
    steps: list[dict[str, Any]] = []

    def run_step(n: int, profile_as: str = "") -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            with proxied(bench, name, flag, "node") as (srv, up):
                r = bench.loadgen(
                    srv,
                    "tokens",
                    [
                        *("--streams", n, "--tokens", s.token_count, "--interval-ms", 20),
                        *("--target", target, "--upstream-pid", up.pid),
                    ],
                    timeout_s=120 + s.token_count * 0.02 + n / 100,
                    profile_as=profile_as,
                )
            return _per_chunk(r)

        return bench.lateness_step(
            f"{name} proxy {client} x{n}" + (" under py-spy" if profile_as else ""),
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
            f"{name} proxy {client}: {n} streams x {s.token_count} tokens at 50/s "
            "through the OpenAI provider (Node upstream)"
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
    if bench.profile and basis is not None:
        profile = proxy_profile(bench, client, basis, run_step)
    metrics = {
        "client": client,
        "client_option": flag is not None,
        "upstream": "bench/peers/openai_upstream.js (Node), pinned to core 1 next to the "
        "load generator (its CPU: upstream_util)",
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
        "tokens_per_stream": s.token_count,
        "steps": steps,
        "profile": profile,
    }
    # The ramp itself ran without py-spy (the profile is a separate run): not profiled.
    bench.record("proxy", variant, name, metrics, profiled=False)


def proxy_profile(
    bench: Bench,
    client: str,
    basis: dict[str, Any],
    run_step: Callable[[int, str], dict[str, Any]],
) -> dict[str, Any] | None:
    """The ramp's held count (else its smallest) once more, under py-spy: writes
    bench/results/profile_proxy_CLIENT.txt, headed by that run's CPU per chunk."""
    n = basis["streams"]
    name = f"proxy_{client}"
    bench.say(f"proxy {client}: {n} streams once more under py-spy")
    try:
        r = run_step(n, name)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        bench.say(f"proxy {client}: profiled run failed: {exc}")
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
            f"proxy, --openai-client {client}: {n} streams x {r['tokens']} tokens at 50/s "
            "through the OpenAI provider against bench/peers/openai_upstream.js; py-spy "
            "samples the whole step (1 s of opening, the steady state, the ends).\n"
            f"This run, under py-spy: server CPU {r.get('server_cpu_us_per_chunk')} µs per "
            f"chunk in the steady window ({cpu.get('server_util', 0):.0%} of core 0), "
            f"steady p99 lateness {out['p99_ms']} ms; without py-spy at this count: "
            f"{basis.get('server_cpu_us_per_chunk')} µs per chunk. A share below times "
            "the µs per chunk is that frame's µs per chunk.\n\n"
        )
        path.write_text(head + path.read_text())
    return out


OPENAI_Q = "/v1/stream?provider=openai&model=gpt-4o-mini&q=hi%20%5Bfake%20{}%5D"
OPENAI_BODY = (
    '{"model":"gpt-4o-mini","stream":true,'
    '"messages":[{"role":"user","content":"hi [fake tokens=1]"}]}'
)


@functools.cache
def openai_client_option() -> bool:
    """Whether this sseserver has ``--openai-client`` (``python -m sseserver --help``)."""
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
    return "--openai-client" in out.stdout


def openai_client_arg(client: str) -> tuple[str | None, str | None]:
    """(the ``--openai-client`` value to pass or None, why ``client`` cannot run or None).
    A server without the option has only the SDK client: ``sdk`` runs without the flag."""
    if openai_client_option():
        return client, None
    if client == "sdk":
        return None, None
    return None, (
        f"sseserver has no --openai-client option yet (python -m sseserver --help), so no "
        f"{client!r} client: only the openai SDK path exists"
    )


def _per_chunk(r: dict[str, Any]) -> dict[str, Any]:
    """Add CPU µs per chunk to a loadgen ``tokens`` result through the OpenAI provider.

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


def prerequisites(upstream: str = "python") -> str | None:
    """None when the proxy scenarios can run against ``upstream``, else why not."""
    if _pkg_version("openai") == "?":
        return "needs the openai package"
    if upstream == "python" and not (ROOT / "tests" / "upstreams" / "openai_wire.py").exists():
        return "needs tests/upstreams/openai_wire.py (the fake OpenAI upstream)"
    if upstream == "node" and not Path(NODE).exists():
        return "needs node for bench/peers/openai_upstream.js (the fast fake OpenAI upstream)"
    return None

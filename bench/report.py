"""The results of a run as a table (RESULTS.md, servers side by side with ratios), charts,
and the figures a closing note quotes."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from bench.harness import LOADGEN_CORE, RESULTS, SERVER_CORE
from bench.scenarios.proxy import PEER_ROW, ROWS
from bench.servers import ALL_SERVERS, SERVERS
from bench.session import NOISE_LIMIT, RETRIES, noise
from bench.settings import (
    DELIVERED_SHARE,
    FIRST_EVENT_BOUND_MS,
    LATENESS_BOUND_MS,
    OPENAI_CLIENTS,
    REPORT_SCENARIOS,
    Settings,
)

# Issue 12's targets for the relay (the relay table's header says them).
RELAY_TARGETS = {
    "streams": 500,  # concurrent proxied 50 chunk/s streams per process, at least
    "us_per_chunk": 30.0,  # server CPU per relayed chunk, at most
    "added_fresh_p50_ms": 0.3,  # TTFT added over the upstream's own, fresh connection
    "added_fresh_p99_ms": 0.5,
    "gemini_vs_openai": 1.5,  # Gemini's figures within this factor of OpenAI's
}


def _get(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)  # type: ignore[assignment]
    return d


# (scenario, label, metric path, better: "low"/"high"/"", format). The proxy scenario has
# a table of its own (relay_table): one row per relay path, its ratios to the aiohttp relay.
METRICS: list[tuple[str, str, str, str, str]] = [
    ("idle", "streams held", "held", "high", "{:,.0f}"),
    ("idle", "RSS per open stream, KB", "rss_per_stream_kb", "low", "{:.2f}"),
    ("idle", "streams per GiB of RSS", "streams_per_gib", "high", "{:,.0f}"),
    ("idle", "streams opened per s", "opened_per_s", "high", "{:,.0f}"),
    ("idle", "failures", "failures", "low", "{:,.0f}"),
    ("tokens", "max streams held (rule below)", "max_streams_held", "high", "{:,}"),
    ("tokens", "events delivered per s there", "events_per_s_at_held", "high", "{:,.0f}"),
    ("tokens", "p99 lateness at that count, ms", "p99_ms_at_held", "", "{:.1f}"),
    ("tokens", "first event p99 there, ms", "first_event_p99_ms_at_held", "", "{:.1f}"),
    ("tokens", "first failing count", "failed_at", "", "{:,}"),
    ("tokens", "generator CPU at failing count", "gen_util_at_fail", "", "{:.0%}"),
    ("fanout", "deliveries per s", "deliveries_per_s", "high", "{:,.0f}"),
    ("fanout", "publishes per s", "publishes_per_s", "high", "{:,.0f}"),
    ("fanout", "delivery latency p50, ms", "latency_ms.p50", "low", "{:.1f}"),
    ("fanout", "delivery latency p99, ms", "latency_ms.p99", "low", "{:.1f}"),
    ("fanout", "server CPU µs per delivery", "server_cpu_us_per_delivery", "low", "{:.2f}"),
    ("fanout", "server / generator CPU", "cpu", "", "util"),
    ("fanout", "lost events / dropped subscribers", "lost", "", "lost"),
    ("ttft", "fresh connection p50, ms", "fresh_ms.p50", "low", "{:.3f}"),
    ("ttft", "fresh connection p99, ms", "fresh_ms.p99", "low", "{:.3f}"),
    ("ttft", "keep-alive p50, ms", "keepalive_ms.p50", "low", "{:.3f}"),
    ("ttft", "keep-alive p99, ms", "keepalive_ms.p99", "low", "{:.3f}"),
    ("cancel", "disconnect → upstream closed p50, ms", "cancel_ms.p50", "low", "{:.1f}"),
    ("cancel", "disconnect → upstream closed p99, ms", "cancel_ms.p99", "low", "{:.1f}"),
    ("cancel", "over 100 ms / not closed in 2 s", "over_100ms", "", "{:,}"),
]
# idle-sub (subscriptions) has the rows of idle (generations)
METRICS += [("idle-sub", *m[1:]) for m in METRICS if m[0] == "idle"]

# What a row holds, after "scenario variant": the two idle kinds side by side.
ROW_KINDS = {"idle": "generations", "idle-sub": "subscriptions"}


def row_name(scenario: str, variant: str) -> str:
    """``idle 10k (generations)``, ``idle-sub 10k (subscriptions)``, ``fanout 1k x1pub``."""
    kind = ROW_KINDS.get(scenario)
    return f"{scenario} {variant}" + (f" ({kind})" if kind else "")


def latest_records(mode: str) -> list[dict[str, Any]]:
    """The newest record of each (scenario, variant, server) of ``mode`` (profiled runs
    left out: sampling slows the server)."""
    path = RESULTS / "results.jsonl"
    newest: dict[tuple[str, str, str], dict[str, Any]] = {}
    order: dict[tuple[str, str, str], int] = {}
    if path.exists():
        for i, line in enumerate(path.read_text().splitlines()):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("mode") == mode and not rec.get("profiled"):
                if rec["scenario"] == "idle" and rec["server"] == "nchan":
                    # nchan's idle streams have always been subscriptions (it has no
                    # generations): records from before idle-sub existed belong there
                    rec["scenario"] = "idle-sub"
                key = (rec["scenario"], rec["variant"], rec["server"])
                newest[key], order[key] = rec, i
    # A whole scenario skipped or failed (variant "-") and measured since: not reported.
    since: dict[tuple[str, str], int] = {}
    for (scenario, variant, server), i in order.items():
        if variant != "-":
            since[(scenario, server)] = max(i, since.get((scenario, server), -1))
    return [
        rec
        for key, rec in newest.items()
        if key[1] != "-" or since.get((key[0], key[2]), -1) < order[key]
    ]


def _cell(metrics: dict[str, Any], path: str, fmt: str) -> tuple[str, float | None]:
    if fmt == "util":
        cpu = metrics.get("cpu") or {}
        if "server_util" not in cpu:
            return "—", None
        return _util_text(cpu), None
    if fmt == "lost":
        if "lost" not in metrics:
            return "—", None
        return f"{metrics['lost']:,} / {metrics.get('dropped_subscribers', 0):,}", None
    value = _get(metrics, path)
    if value is None:
        return "—", None
    return fmt.format(value), float(value)


def _util_text(cpu: dict[str, Any]) -> str:
    """``server / generator`` CPU share, then what else ran on the generator's core:
    ``+ upstream N%`` (proxy), ``+ redis-server N%`` (sseserver-redis)."""
    text = f"{cpu.get('server_util', 0):.0%} / {cpu['gen_util']:.0%}"
    if "upstream_util" in cpu:
        text += f" + upstream {cpu['upstream_util']:.0%}"
    if "redis_util" in cpu:
        text += f" + redis-server {cpu['redis_util']:.0%}"
    return text


def write_report(records: list[dict[str, Any]], settings: Settings) -> Path:
    # Proxy records of relay paths that no longer exist (no "row": the `fast` client, the
    # rows before issue 12's table) are left out.
    records = [
        r
        for r in records
        if r["scenario"] != "proxy" or r["variant"] == "-" or "row" in (r["metrics"] or {})
    ]
    relay = [r for r in records if r["scenario"] == "proxy"]
    records = [r for r in records if r["scenario"] != "proxy"]
    servers = [s for s in ALL_SERVERS if any(r["server"] == s for r in records)]
    by_key = {(r["scenario"], r["variant"], r["server"]): r for r in records}
    groups: list[tuple[str, str]] = []
    for r in sorted(
        records,
        key=lambda r: (REPORT_SCENARIOS.index(r["scenario"]), _variant_order(r["variant"])),
    ):
        if (r["scenario"], r["variant"]) not in groups:
            groups.append((r["scenario"], r["variant"]))
    lines = [
        "# sseserver benchmarks, side by side",
        "",
        f"Mode `{settings.mode}`, written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
        f"`python -m bench.run --{settings.mode}` (newest result of each cell from "
        "`results.jsonl`).",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Linux {platform.release()}, Python {platform.python_version()}; server pinned to "
        f"core {SERVER_CORE}, load generator to core {LOADGEN_CORE}; loopback only; a shared, "
        "noisy machine (per-core busy time is in each JSON record as `cpu0_busy`/`cpu1_busy`).",
        "",
        "Each cell: the value, then its ratio to sseserver's (x). For rows marked ↓ lower "
        "is better, ↑ higher is better. `—`: not measured (nchan has no /v1/stream; "
        "sseserver-redis runs fan-out only).",
        "",
        "A count of token streams (tokens, proxy) is held only as a user sees it: the "
        "streams' requests spread over 1 s (proxy: 2 s), every stream answered and every "
        "token delivered "
        "by 0.5 s after the schedule's end (no slack), each stream's first event within "
        f"{FIRST_EVENT_BOUND_MS:.0f} ms of its request at p99, at least "
        f"{DELIVERED_SHARE:.0%} of the events offered in the steady window (every request "
        "sent, no stream ended) delivered inside it, and token lateness p99 within "
        f"{LATENESS_BOUND_MS:.0f} ms, measured from each request's own schedule (token i due "
        "at request + i * 20 ms), not from the stream's first event.",
        "",
        "`idle N (generations)`: N `/v1/stream` generations held with the first token 10 "
        "minutes away (each a running generation: its place on the provider's clock, its "
        "record, history). "
        "`idle-sub N (subscriptions)`: N subscriptions to one topic nobody publishes to "
        "(sseserver `/.well-known/mercure?topic=idle`, the peers `/sub?topic=idle`, nchan "
        "`/sub/idle`). nchan has no generations: its idle numbers are subscriptions and sit "
        "in the idle-sub rows only.",
        "",
        "`sseserver-redis`: sseserver with `--hub redis://…` against a private `redis-server` "
        "(no persistence) that runs on core 1 next to the load generator; its CPU is shown as "
        "`+ redis-server N%` after the generator's. Its ratios compare the Redis hub with "
        "sseserver's in-memory hub.",
        "",
    ]
    header = "| scenario | metric | " + " | ".join(servers) + " |"
    lines += [header, "|" + "---|" * (len(servers) + 2)]
    for scenario, variant in groups:
        group = [by_key.get((scenario, variant, server)) for server in servers]
        if not any(rec and (rec["ok"] or rec.get("error")) for rec in group):
            dashes = " | ".join("—" for _ in servers)
            lines.append(f"| {row_name(scenario, variant)} | not measured (below) | {dashes} |")
            continue
        for scen, label, path, better, fmt in METRICS:
            scen, _, prefix = scen.partition("@")
            if scen != scenario or not variant.startswith(prefix):
                continue
            base_rec = by_key.get((scenario, variant, "sseserver"))
            base = _cell(base_rec["metrics"], path, fmt)[1] if base_rec else None
            cells = []
            for server in servers:
                rec = by_key.get((scenario, variant, server))
                if rec is None or not rec["ok"]:
                    reason = (rec or {}).get("error") or (rec or {}).get("skipped")
                    cells.append("error" if reason and rec and rec.get("error") else "—")
                    continue
                text, value = _cell(rec["metrics"], path, fmt)
                if better and server != "sseserver" and value is not None and base not in (None, 0):
                    text += f" (x{value / base:.2f})"
                cells.append(text)
            arrow = {"low": " ↓", "high": " ↑"}.get(better, "")
            lines.append(
                f"| {row_name(scenario, variant)} | {label}{arrow} | " + " | ".join(cells) + " |"
            )
    lines += relay_table(relay)
    skipped = [r for r in records + relay if r.get("skipped")]
    errors = [r for r in records + relay if r.get("error")]
    if skipped or errors:
        lines += ["", "Not measured:", ""]
        for r in skipped:
            variant = "" if r["variant"] == "-" else f" {r['variant']}"
            lines.append(f"- {r['scenario']}{variant} ({r['server']}): {r['skipped']}")
        for r in errors:
            lines.append(f"- {r['scenario']} {r['variant']} ({r['server']}): error: {r['error']}")
    lines += ["", "## Is the load generator the bottleneck?", ""]
    lines.append(
        "CPU share of its core over each measured window: server (core 0) and generator "
        "(core 1). A generator near 100% means that row measures the generator, not the "
        "server. `noise`: share of a core other programs took in that window (runs with more "
        f"than {NOISE_LIMIT:.0%} are measured again, up to {RETRIES} times, keeping the "
        "least noisy)."
    )
    lines += ["", "| scenario | " + " | ".join(servers) + " |", "|" + "---|" * (len(servers) + 1)]
    for scenario, variant in groups:
        if scenario == "tokens":
            continue
        cells = []
        for server in servers:
            rec = by_key.get((scenario, variant, server))
            cpu = None
            if rec and rec["ok"]:
                m = rec["metrics"]
                cpu = m.get("cpu") or m.get("cpu_open") or m.get("cpu_fresh")
            if not cpu:
                cells.append("—")
            else:
                text = _util_text(cpu)
                if noise(cpu) > 0.1:
                    text += f" (noise {noise(cpu):.0%})"
                cells.append(text)
        lines.append(f"| {row_name(scenario, variant)} | " + " | ".join(cells) + " |")
    tok = [r for r in records if r["scenario"] == "tokens" and r["ok"]]
    if tok:
        lines += [
            "",
            "Token streams, each step: streams: steady-state p99 lateness in ms (server / "
            "generator CPU over the steady window):",
            "",
        ]
        for r in sorted(tok, key=lambda r: servers.index(r["server"])):
            lines.append(f"- {r['server']}: " + "; ".join(_step_texts(r)))
    ramps = [r for r in relay if r["ok"] and "steps" in r["metrics"]]
    if ramps:
        lines += [
            "",
            "Relayed streams against the Node upstreams (`bench/peers/openai_upstream.js`, "
            "`gemini_upstream.js`), which run on core 1 next to the load generator; each "
            "step: streams: steady-state p99 lateness in ms (server / generator / upstream "
            "CPU over the steady window, server CPU µs per chunk):",
            "",
        ]
        for r in sorted(ramps, key=_relay_order):
            lines.append(f"- {_relay_label(r)}: " + "; ".join(_step_texts(r)))
    shown = servers + [
        s for s in ALL_SERVERS if s not in servers and any(r["server"] == s for r in relay)
    ]
    lines += ["", "Versions: " + "; ".join(f"{s}: {SERVERS[s].version()}" for s in shown), ""]
    charts = [p.name for p in sorted(RESULTS.glob("*.png"))]
    if charts:
        lines += ["Charts: " + ", ".join(f"[{c}]({c})" for c in charts), ""]
    report = RESULTS / "RESULTS.md"
    report.write_text("\n".join(lines))
    return report


def _relay_order(r: dict[str, Any]) -> tuple[int, int]:
    """Rows in the order of ``ROWS``: sseserver's, then the peer's."""
    names = [(server, row.name) for server, rows in ROWS.items() for row in rows]
    key = (r["server"], r["metrics"].get("row"))
    return (names.index(key) if key in names else len(names), 0 if "ttft" in r["variant"] else 1)


def _relay_label(r: dict[str, Any]) -> str:
    m = r["metrics"]
    if r["server"] != "sseserver":
        return f"{r['server']} ({m.get('route')}, {m.get('provider')})"
    return f"sseserver {m.get('route')} {m.get('provider')} {m.get('client')}"


def _ratio(value: Any, base: Any) -> str:
    """``value / base``; none when either is missing or not above zero (an added TTFT
    can measure below zero in noise: no ratio means anything then)."""
    if not isinstance(value, int | float) or not isinstance(base, int | float):
        return "—"
    if base <= 0 or value < 0:
        return "—"
    return f"x{value / base:.2f}"


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def relay_table(relay: list[dict[str, Any]]) -> list[str]:
    """Issue 12's relay figures, one row per relay path (route, provider, client; the
    aiohttp relay peer last), each with its ratios to the peer's row: streams held, server
    CPU µs per chunk, the TTFT added on a fresh connection (p50/p99)."""
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in sorted(relay, key=_relay_order):
        row = (r["metrics"] or {}).get("row")
        if row:
            part = "ttft" if r["variant"].startswith("ttft") else "streams"
            rows.setdefault((r["server"], row), {})[part] = r
    if not rows:
        return []
    t = RELAY_TARGETS
    out = [
        "",
        "## Relay (issue 12): proxied streams, server CPU per chunk, TTFT added",
        "",
        f"Targets: ≥ {t['streams']} concurrent 50 chunk/s streams per process, ≤ "
        f"{t['us_per_chunk']:.0f} µs server CPU per relayed chunk, TTFT added over the "
        f"upstream's own on a fresh connection p50 ≤ {t['added_fresh_p50_ms']} ms and p99 ≤ "
        f"{t['added_fresh_p99_ms']} ms; Gemini within x{t['gemini_vs_openai']} of OpenAI. "
        "Streams: 200 chunks at 50/s from a fake upstream "
        "(`bench/peers/{openai,gemini}_upstream.js`, Node, on core 1 next to the load "
        "generator), requests spread over 2 s so that every stream is open upstream at once, "
        "held by the rule above; µs per chunk: server CPU over the steady window / chunks "
        "delivered in it, at the count held (else at the smallest count tried, in "
        "parentheses). TTFT added: TTFT through the server minus the upstream's own (the "
        "tests' Python fakes, measured directly), on a fresh connection to the server each "
        "time (keep-alive in parentheses). `/v1/chat/completions` answers are the upstream's "
        "`chat.completion.chunk` events relayed as they came; `/v1/stream` answers are "
        "sseserver's own events. Client: sseserver's `--openai-client` / `--gemini-client` "
        "(`lean`: its own upstream client, the default; `sdk`: the official SDK). The peer, "
        "`aiohttp-relay` (bench/peers/aiohttp_relay.py: an aiohttp server and one shared "
        "aiohttp `ClientSession`, the upstream's bytes passed through unparsed), runs the load "
        "of the `/v1/chat/completions` rows; `vs peer` is each row's figure over the peer's "
        "(streams: higher is better; µs and TTFT: lower is better).",
        "",
        "| route | provider | client / peer | streams held ↑ | first failing | p99 lateness "
        "there, ms | µs CPU per chunk ↓ | added TTFT fresh p50 / p99, ms ↓ (keep-alive) | "
        "server / generator + upstream CPU | vs peer: streams / µs per chunk / TTFT p50 / "
        "TTFT p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer = _parts(rows.get(PEER_ROW, {}))
    for key, recs in rows.items():
        first = next(iter(recs.values()))["metrics"]
        m = _parts(recs)
        who = first.get("client") if key[0] == "sseserver" else f"{key[0]} (peer)"
        streams = _part_text(recs.get("streams"), m, "max_streams_held", "{:,}")
        us = _part_text(recs.get("streams"), m, "server_cpu_us_per_chunk", "{:.1f}")
        if m.get("server_cpu_us_per_chunk") is not None and not m.get("max_streams_held"):
            us += f" (at {m.get('server_cpu_us_per_chunk_at')})"
        ttft = _part_text(recs.get("ttft"), m, "added_fresh_p50_ms", "{:.3f}")
        if m.get("added_fresh_p50_ms") is not None:
            ttft += (
                f" / {_num(m.get('added_fresh_p99_ms'), '{:.3f}')}"
                f" ({_num(m.get('added_keepalive_p50_ms'), '{:.3f}')} /"
                f" {_num(m.get('added_keepalive_p99_ms'), '{:.3f}')})"
            )
        cpu = _util_text(m["cpu"]) if m.get("cpu") else "—"
        vs = "—" if key == PEER_ROW else " / ".join(_ratios(m, peer))
        out.append(
            f"| {first.get('route')} | {first.get('provider')} | {who} | {streams} | "
            f"{_num(m.get('failed_at'), '{:,}')} | {_num(m.get('p99_ms_at_held'), '{:.1f}')} | "
            f"{us} | {ttft} | {cpu} | {vs} |"
        )
    gemini = []
    for (server, name), recs in rows.items():
        twin = rows.get((server, name.replace("-gemini-", "-openai-")))
        if server != "sseserver" or "-gemini-" not in name or twin is None:
            continue
        streams, us, p50, _ = _ratios(_parts(recs), _parts(twin))
        gemini.append(
            f"- {name} over {name.replace('-gemini-', '-openai-')}: streams held {streams}, "
            f"µs per chunk {us}, added TTFT fresh p50 {p50}"
        )
    if gemini:
        out += ["", f"Gemini over OpenAI (target: within x{t['gemini_vs_openai']}):", "", *gemini]
    return out


RATIO_KEYS = (
    "max_streams_held",
    "server_cpu_us_per_chunk",
    "added_fresh_p50_ms",
    "added_fresh_p99_ms",
)


def _parts(recs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The metrics of a relay row's parts (streams, ttft) that measured, in one dict;
    ``cpu`` is the streams part's (at the count held)."""
    out: dict[str, Any] = {}
    for part in ("ttft", "streams"):
        m = _ok_metrics(recs.get(part))
        if m:
            out.update({k: v for k, v in m.items() if part == "streams" or k != "cpu"})
    return out


def _ratios(m: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """``m``'s figures over ``base``'s (RATIO_KEYS)."""
    return [_ratio(m.get(k), base.get(k)) for k in RATIO_KEYS]


def _ok_metrics(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    return rec["metrics"] if rec and rec["ok"] else None


def _part_text(rec: dict[str, Any] | None, m: dict[str, Any], key: str, fmt: str) -> str:
    """A relay table cell: the value, or why there is none (error, skipped, not run)."""
    if rec is None:
        return "—"
    if not rec["ok"]:
        return "error" if rec.get("error") else "skipped"
    return _num(m.get(key), fmt)


def _step_texts(r: dict[str, Any]) -> list[str]:
    """One short text per step of a lateness ramp (tokens, proxy 50/s)."""
    parts = []
    for st in r["metrics"].get("steps", []):
        cpu = st.get("cpu_steady") or st["cpu"]
        lat = st.get("steady_lateness_ms") or st["lateness_ms"]
        util = f"{cpu.get('server_util', 0):.0%}/{cpu['gen_util']:.0%}"
        if "upstream_util" in cpu:
            util += f"/{cpu['upstream_util']:.0%}"
        if st.get("server_cpu_us_per_chunk") is not None:
            util += f", {st['server_cpu_us_per_chunk']:.0f} µs"
        parts.append(
            f"{st['streams']}: {lat.get('p99', '—')} ({util})"
            + ("" if st["held"] else f" ✗ (lost {st['lost']})")
        )
    return parts


def write_charts(records: list[dict[str, Any]]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    servers = [s for s in ALL_SERVERS if any(r["server"] == s for r in records)]
    colors = dict(zip(ALL_SERVERS, ["C3", "C5", "C0", "C2", "C1", "C6", "C4"], strict=True))

    idle = [r for r in records if r["scenario"] in ROW_KINDS and r["ok"]]
    if idle:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for server in servers:
            for r in (r for r in idle if r["server"] == server):
                pts = sorted(r["metrics"].get("curve", []))
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] / 1024 for p in pts],
                        marker=".",
                        ls="-" if r["scenario"] == "idle" else "--",
                        color=colors[server],
                        label=f"{server} {r['variant']} {ROW_KINDS[r['scenario']]}",
                    )
        ax.set_xlabel("open idle streams")
        ax.set_ylabel("server RSS, MB")
        ax.set_title("Capacity: server memory vs open streams (dashed: subscriptions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, "capacity.png"))

    tok = [r for r in records if r["scenario"] == "tokens" and r["ok"]]
    if tok:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in sorted(tok, key=lambda r: servers.index(r["server"])):
            steps = sorted(r["metrics"].get("steps", []), key=lambda s: s["streams"])
            lats = [(s["streams"], s.get("steady_lateness_ms") or s["lateness_ms"]) for s in steps]
            lats = [(n, lat) for n, lat in lats if lat.get("n")]
            xs = [n for n, _ in lats]
            p99 = [max(0.01, lat["p99"]) for _, lat in lats]
            p50 = [max(0.01, lat["p50"]) for _, lat in lats]
            c = colors[r["server"]]
            ax.plot(xs, p99, marker="o", color=c, label=f"{r['server']} p99")
            ax.plot(xs, p50, marker=".", ls=":", color=c, label=f"{r['server']} p50")
        ax.axhline(LATENESS_BOUND_MS, color="k", ls="--", lw=1, label="50 ms bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams at 50 tokens/s")
        ax.set_ylabel("token lateness, ms")
        ax.set_title("Latency: token lateness vs concurrent streams")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, "tokens_latency.png"))

    fan = [r for r in records if r["scenario"] == "fanout" and r["ok"]]
    if fan:
        variants = sorted({r["variant"] for r in fan}, key=_variant_order)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            xs, rate, p99 = [], [], []
            for j, v in enumerate(variants):
                rec = next((r for r in fan if r["server"] == server and r["variant"] == v), None)
                if rec:
                    xs.append(j + i * width)
                    rate.append(rec["metrics"]["deliveries_per_s"] / 1000)
                    p99.append(rec["metrics"]["latency_ms"].get("p99") or 0)
            ax1.bar(xs, rate, width, color=colors[server], label=server)
            ax2.bar(xs, p99, width, color=colors[server], label=server)
        for ax in (ax1, ax2):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], variants)
            ax.grid(alpha=0.3, axis="y")
        ax1.set_ylabel("deliveries per s (thousands)")
        ax1.set_title("Fan-out throughput")
        ax2.set_yscale("log")
        ax2.set_ylabel("delivery latency p99, ms (log)")
        ax2.set_title("Fan-out latency")
        ax1.legend(fontsize=8)
        written.append(_save(fig, "fanout.png"))

    ttft = [r for r in records if r["scenario"] == "ttft" and r["ok"]]
    if ttft:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = ["fresh p50", "fresh p99", "keep-alive p50", "keep-alive p99"]
        paths = ["fresh_ms.p50", "fresh_ms.p99", "keepalive_ms.p50", "keepalive_ms.p99"]
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            rec = next((r for r in ttft if r["server"] == server), None)
            if rec:
                vals = [_get(rec["metrics"], p) or 0 for p in paths]
                ax.bar(
                    [j + i * width for j in range(4)],
                    vals,
                    width,
                    color=colors[server],
                    label=server,
                )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(4)], labels)
        ax.set_ylabel("request sent → first token, ms")
        ax.set_title("Time to first token added by the server")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        written.append(_save(fig, "ttft.png"))
    return written


def _variant_order(variant: str) -> tuple[float, list[tuple[int, int | str]]]:
    """'1k x4pub' -> (1000, [(1, 'x4pub')]): sizes in numeric order, then the words, the
    OpenAI clients in OPENAI_CLIENTS order ('50/s sdk' before '50/s lean')."""
    head, _, rest = variant.partition(" ")
    try:
        size = float(head.rstrip("k")) * (1000 if head.endswith("k") else 1)
    except ValueError:
        size = float("inf")
    words: list[tuple[int, int | str]] = [
        (0, OPENAI_CLIENTS.index(w)) if w in OPENAI_CLIENTS else (1, w) for w in rest.split()
    ]
    return size, words


def _save(fig: Any, name: str) -> Path:
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def closing_note(records: list[dict[str, Any]]) -> str:
    """The sseserver figures the core issue's closing note needs (and its Redis hub's)."""
    out = []
    # proxy rows last, in the order of the Relay table
    for r in sorted(
        records, key=lambda r: _relay_order(r) if r["scenario"] == "proxy" else (-1, 0)
    ):
        if r["server"] not in ("sseserver", "sseserver-redis") or not r["ok"]:
            continue
        m = r["metrics"]
        if r["server"] == "sseserver-redis":
            if r["scenario"] == "fanout":
                out.append(
                    f"sseserver-redis fanout {r['variant']}: {m['deliveries_per_s']:,.0f} "
                    f"deliveries/s, latency p50 {m['latency_ms'].get('p50')} ms / p99 "
                    f"{m['latency_ms'].get('p99')} ms, server / generator CPU "
                    f"{_util_text(m.get('cpu') or {'gen_util': 0})}"
                )
        elif r["scenario"] in ROW_KINDS:
            out.append(
                f"sseserver {row_name(r['scenario'], r['variant'])}: {m['held']:,} streams held, "
                f"{m['rss_per_stream_kb']:.2f} KB RSS per stream "
                f"(~{m.get('streams_per_gib') or 0:,} streams per GiB), "
                f"{m['opened_per_s']:,.0f} streams opened per s, {m['failures']} failures"
                + (f" [capped by {m['capped_by']}]" if m.get("capped_by") else "")
            )
        elif r["scenario"] == "tokens":
            out.append(
                f"sseserver tokens: {m['max_streams_held']:,} concurrent 50 token/s streams "
                f"held with p99 lateness {m['p99_ms_at_held']} ms (≤ {m['bound']:.0f} ms); "
                f"first failing count {m['failed_at']}"
            )
        elif r["scenario"] == "proxy" and "steps" in m and "row" in m:
            out.append(
                f"sseserver proxy {m['route']} {m['provider']} {m['client']}: "
                f"{m['max_streams_held']:,} concurrent 50 chunk/s streams held with p99 "
                f"lateness {m['p99_ms_at_held']} ms; first failing count {m['failed_at']}; "
                f"server CPU {m['server_cpu_us_per_chunk']} µs per chunk "
                f"(at {m['server_cpu_us_per_chunk_at']} streams)"
            )
        elif r["scenario"] == "proxy" and "row" in m and "added_fresh_p50_ms" in m:
            out.append(
                f"sseserver proxy {m['route']} {m['provider']} {m['client']}: TTFT added on a "
                f"fresh connection p50 {m['added_fresh_p50_ms']} ms, p99 "
                f"{m.get('added_fresh_p99_ms')} ms"
            )
    return "\n".join(out)

"""The scenarios, one module each; a new one is a module here plus a line in SCENARIOS
(and its name in ``bench.settings.ALL_SCENARIOS``)."""

from __future__ import annotations

from collections.abc import Callable

from bench.scenarios import cancel, fanout, idle, proxy, tokens, ttft
from bench.session import Bench

SCENARIOS: dict[str, Callable[[Bench, str], None]] = {
    "idle": idle.run,
    "tokens": tokens.run,
    "fanout": fanout.run,
    "ttft": ttft.run,
    "proxy": proxy.run,
    "cancel": cancel.run,
}

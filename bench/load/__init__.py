"""The load generator's parts: shared machinery (``meters``, ``addressing``, ``streams``)
and one module per scenario, each exposing its ``run_*`` coroutine; ``SCENARIOS`` maps a
scenario's name on the command line (``python -m bench.loadgen NAME``) to it.

Imports flow one way: a scenario module imports the shared ones, never another scenario.

The hot paths do as little as the measurement needs:
- an open stream counts once its response head arrives (idle);
- a token stream counts ``{"text"`` markers per read (``bytes.count``, in C) and timestamps
  each with the read's clock (tokens, ttft);
- a fan-out subscriber counts ``@`` bytes per read (the publisher's payload is
  ``@<monotonic time>#``); only every k-th subscriber (a "probe") parses the timestamps.

Every result carries the generator's own CPU time (getrusage) next to the server's
(/proc/PID/stat) over the same window, so a reader can tell which side was saturated.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

from bench.load.cancel import run_cancel
from bench.load.fanout import run_fanout
from bench.load.idle import run_idle
from bench.load.streams import Progress
from bench.load.tokens import run_tokens
from bench.load.ttft import run_ttft

Scenario = Callable[[argparse.Namespace, Progress], Coroutine[Any, Any, dict[str, Any]]]

SCENARIOS: dict[str, Scenario] = {
    "idle": run_idle,
    "tokens": run_tokens,
    "fanout": run_fanout,
    "ttft": run_ttft,
    "cancel": run_cancel,
}

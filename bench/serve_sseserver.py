"""Run sseserver with RLIMIT_NOFILE raised to its hard limit (for the benchmarks).

python -m bench.serve_sseserver --port 8000 --log-level warning
"""

from __future__ import annotations

import resource
import sys

from sseserver.cli import main


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


if __name__ == "__main__":
    raise_nofile()
    sys.exit(main(sys.argv[1:]))

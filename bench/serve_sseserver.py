"""Run sseserver with RLIMIT_NOFILE raised to its hard limit (for the benchmarks).

python -m bench.serve_sseserver --port 8000 --log-level warning
"""

from __future__ import annotations

import sys

from bench.loadgen import raise_nofile
from sseserver.cli import main

if __name__ == "__main__":
    raise_nofile()
    sys.exit(main(sys.argv[1:]))

"""Run sseserver with RLIMIT_NOFILE raised to its hard limit (for the benchmarks).

python -m bench.serve_sseserver --port 8000 --log-level warning
"""

from __future__ import annotations

import sys

from sseserver.cli import main
from tests.support.procs import raise_nofile

if __name__ == "__main__":
    raise_nofile()
    sys.exit(main(sys.argv[1:]))

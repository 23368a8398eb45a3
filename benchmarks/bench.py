"""Weight sync measured side by side with the field's methods (pytest-free).

The same run as `weightsync bench`, with the same options:

    python benchmarks/bench.py --size tiny --e2e-syncs 2 --json out.json --plot out.png
    flock /tmp/weightsync-bigrun.lock python benchmarks/bench.py --json bench.json

See docs/benchmarks.md for what it measures and a recorded full run.
"""

from __future__ import annotations

import logging
import sys

import weightsync.cli.bench  # noqa: F401  (registers the `bench` command)
from weightsync.cli import app

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(["bench", *sys.argv[1:]])

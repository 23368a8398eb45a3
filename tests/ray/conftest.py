"""Ray on loopback only: read by `ray` when it is imported, so set before any test imports it.

Ray picks a node's address from the route to the outside unless told it is a
single-machine cluster; then every Ray process (GCS, raylets, workers, the
driver) uses 127.0.0.1.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

"""`python -m weightsync.server LAUNCH_FILE`: one replica process, as a gateway starts it."""

import os
import sys

from weightsync.server.replica_process import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))

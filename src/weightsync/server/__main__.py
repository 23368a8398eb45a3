"""`python -m weightsync.server serve ...`: how the gateway spawns replica processes."""

from weightsync.cli import main

if __name__ == "__main__":
    main()

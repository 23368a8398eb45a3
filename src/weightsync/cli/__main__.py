"""`python -m weightsync.cli`: the `weightsync` command without the console script."""

from weightsync.cli import main

if __name__ == "__main__":
    main()

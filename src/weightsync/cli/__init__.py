"""The `weightsync` command: parse, call the library, print. No business logic here.

Each command group lives in its own module and registers itself on `app`.
Environment variables are read only here, at the CLI edge.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="weightsync",
    help="Sync freshly trained LLM weights from an RL trainer into a running deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, imported for their side effect of registering on `app`; imported
# only once `app` exists, since each imports it from here.
_COMMAND_MODULES = ("serve", "snapshot", "deploy", "demo", "bench")


def _register_commands() -> None:
    for module in _COMMAND_MODULES:
        importlib.import_module(f"weightsync.cli.{module}")


@app.callback()
def _root() -> None:
    """weightsync: fast, lossless, verified weight sync for RL training."""


def main() -> None:
    """Console-script entry point."""
    _register_commands()
    app()

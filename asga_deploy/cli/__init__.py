"""The `asga` command line: thin commands that parse options, call a run_*() function, print a summary.

Each command group lives in its own module and registers itself on `app`.
"""

from __future__ import annotations

import typer

from .common import OneLineErrors

app = typer.Typer(name="asga", cls=OneLineErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, help="Search, fine-tune and export mixed-precision quantized CNNs (ASGA).")

# each module registers its commands on `app` (order = order in --help)
from . import train_cmd, search_cmd, sensitivity_cmd, finetune_cmd, export_cmd, demo_cmd, policy_cmd  # noqa: E402,F401,I001
from . import lut_cmd  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()

"""Shared CLI pieces: one-line errors with exit code 2, the rich progress renderer, tables."""

from __future__ import annotations

import functools
import re
import sys

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup
from typer.exceptions import Abort

from ..errors import AsgaError, OptionError
from ..progress import ProgressEvent
from ..validate import SEED_MAX, check_number

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2):
    """Print one line on stderr and exit with code (2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Decorator for commands: an AsgaError (or Ctrl-C) becomes one stderr line and exit code 2 (130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AsgaError as e:
            fail(str(e).replace("\n", " "))
        except KeyboardInterrupt:
            typer.echo("interrupted: the last completed checkpoint is kept; rerun with --resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _usage_line(e: ClickException) -> str:
    """Return a click usage error (bad option value, missing argument, unknown option) as one line."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return (msg[:1].lower() + msg[1:]).rstrip(".") + hint


class OneLineErrors(TyperGroup):
    """The app's group: usage errors and option checks fail in one `error: ` line with exit code 2, as every
    other user mistake does (click would print a usage block and a panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Run the CLI; print click's usage errors and AsgaErrors raised while parsing as one line."""
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except NoArgsIsHelpError:  # the help is already printed
            if not standalone_mode:
                raise
            sys.exit(2)
        except ClickException as e:
            if not standalone_mode:
                raise
            typer.echo(f"error: {_usage_line(e)}", err=True)
            sys.exit(2)
        except AsgaError as e:  # raised by an option's check (callbacks run while parsing)
            if not standalone_mode:
                raise
            typer.echo(f"error: {str(e).replace(chr(10), ' ')}", err=True)
            sys.exit(2)
        except Abort:
            if not standalone_mode:
                raise
            typer.echo("aborted", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


# ---------------------------------------------------------------- option checks (run while parsing)

SEED = {"min": 0, "max": SEED_MAX}  # typer.Option(0, **SEED): a seed in 0..2^32-1


def _option_name(param: typer.CallbackParam) -> str:
    return max(param.opts, key=len) if param.opts else str(param.name)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """Return an option callback that refuses NaN, infinities and values outside [lo, hi] (open ends optional).

    typer.Option(0.1, callback=number(0, lo_open=True)): a positive finite float; None (not given) passes.
    """
    def check(param: typer.CallbackParam, value):
        return value if value is None else check_number(_option_name(param), value, lo, hi, lo_open, hi_open)

    return check


def _device(param: typer.CallbackParam, value):
    if value is not None and not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise OptionError(f"--device {value!r} unknown; use auto, cpu, cuda or cuda:N")
    return value


DEVICE = {"callback": _device, "help": "auto, cpu, cuda or cuda:N"}  # typer.Option("auto", **DEVICE)


def choice(*allowed: str):
    """Return an option callback that refuses a word outside `allowed`, naming them."""
    def check(param: typer.CallbackParam, value):
        if value is not None and value not in allowed:
            raise OptionError(f"{_option_name(param)} {value!r} unknown; choose one of {', '.join(allowed)}")
        return value

    return check


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """Return a two-column (name, value) rich table for a command's summary."""
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for k, v in rows:
        table.add_row(k, v)
    return table


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


class RichProgress:
    """A progress callback: a rich bar per stage with epoch, step and the reported metrics."""

    def __init__(self, keys: tuple[str, ...] | None = None, enabled: bool | None = None):
        self.keys = keys
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.kind == "info":
            err_console.print(f"[dim]{ev.stage}:[/dim] {ev.message}")
            return
        if ev.kind == "end":
            self.close()
            return
        if ev.kind == "epoch":
            items = {k: v for k, v in ev.metrics.items() if not isinstance(v, (list, dict))}
            text = "  ".join(f"{k}={_fmt(v)}" for k, v in items.items())
            err_console.print(f"{ev.stage} epoch {ev.epoch}/{ev.epochs}  {text}")
            return
        if not self.enabled:
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[m]}"),
                                     console=err_console, transient=True)
            self.progress.start()
        total = max(ev.steps * max(ev.epochs, 1), 1)
        done = (max(ev.epoch, 1) - 1) * ev.steps + ev.step
        items = {k: v for k, v in ev.metrics.items() if self.keys is None or k in self.keys}
        m = "  ".join(f"{k}={_fmt(v)}" for k, v in items.items())
        desc = f"{ev.stage} {ev.epoch}/{ev.epochs}"
        if self.task is None:
            self.task = self.progress.add_task(desc, total=total, m=m)
        self.progress.update(self.task, description=desc, completed=done, total=total, m=m)

    def close(self) -> None:
        """Stop the bar."""
        if self.progress is not None:
            self.progress.stop()
        self.progress, self.task = None, None

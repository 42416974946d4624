"""Shared CLI pieces: one-line errors with exit code 2, the rich progress renderer, tables."""

from __future__ import annotations

import functools
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

from ..errors import AsgaError
from ..progress import ProgressEvent

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

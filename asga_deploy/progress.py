"""Progress events: library code reports through a callback, the CLI renders them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ProgressEvent:
    """One progress report: `kind` is 'start', 'step', 'epoch', 'end' or 'info'."""

    kind: str
    stage: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    metrics: dict = field(default_factory=dict)
    message: str = ""


Callback = Callable[[ProgressEvent], None]


def emit(callback: Callback | None, event: ProgressEvent) -> None:
    """Send an event to the callback, if there is one."""
    if callback is not None:
        callback(event)

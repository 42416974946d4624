"""Range checks of numbers, shared by the CLI's option callbacks and the library's configs (one wording).

Every number a user gives passes through here before any work: NaN, infinities, zero or negative
values where only positive ones make sense, and seeds beyond what the generators take are refused
with a message that names the option and the allowed range.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import OptionError

SEED_MAX = 2**32 - 1  # numpy takes 32-bit seeds; loaders seed with seed * 100003 + epoch (64 bits)


def describe(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """Return the allowed range in words ('a positive finite number', 'a number in (0, 1]', ...)."""
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo == 0 and lo_open:
        return "a positive finite number"
    if lo is not None:
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"a finite number {'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> Any:
    """Return value; raise OptionError when it is not a finite number within [lo, hi] (open ends optional)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} {value!r}: must be {describe(lo, hi, lo_open, hi_open)}") from None
    if isinstance(value, bool) or not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (
            hi is not None and (v >= hi if hi_open else v > hi)):
        raise OptionError(f"{name} {value}: must be {describe(lo, hi, lo_open, hi_open)}")
    return value


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> Any:
    """Return value; raise OptionError when it is not an integer within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or (
            hi is not None and value > hi):
        allowed = (f"an integer in {lo}..{hi}" if lo is not None and hi is not None else
                   f"an integer >= {lo}" if lo is not None else f"an integer <= {hi}")
        raise OptionError(f"{name} {value!r}: must be {allowed}")
    return value


def check_recipe(r: Any) -> None:
    """Raise OptionError naming the first setting of a training recipe (train.Recipe) that is out of range."""
    check_int("--epochs", r.epochs, 1)
    check_int("--batch-size", r.batch_size, 1)
    check_int("--warmup-epochs", r.warmup_epochs, 0)
    check_int("--workers", r.workers, 0)
    if r.freeze_bn_after is not None:
        check_int("--freeze-bn-after", r.freeze_bn_after, 0)
    check_int("--seed", r.seed, 0, SEED_MAX)
    check_number("--lr", r.lr, 0, lo_open=True)
    check_number("--weight-decay", r.weight_decay, 0)
    check_number("momentum", r.momentum, 0, 1, hi_open=True)
    check_number("label smoothing", r.label_smoothing, 0, 1, hi_open=True)
    check_number("--kd-temperature", r.kd_temperature, 0, lo_open=True)
    check_number("--kd-alpha", r.kd_alpha, 0, 1)

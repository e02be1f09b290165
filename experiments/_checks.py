"""Config checks shared by the experiment modules: a value (or sequence of values) of the right
kind and range, or a ValueError naming the config key, what it got and what it expects."""

from __future__ import annotations

import numpy as np

__all__ = ["as_tuple", "config_int", "config_number", "int_values"]


def as_tuple(value) -> tuple:
    """``value`` as a tuple: lists and tuples element-wise, anything else as one element."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def int_values(name: str, value, lo: int, hi: int | None = None) -> tuple[int, ...]:
    """One or more integers (not bools) in ``[lo, hi]`` (``hi`` None: no upper bound).

    Raises:
      ValueError: naming ``name``, the value and the expected range.
    """
    vals = as_tuple(value)
    ok = len(vals) > 0 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        and v >= lo and (hi is None or v <= hi) for v in vals)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be integers {rng}; got {value!r}")
    return tuple(int(v) for v in vals)


def config_number(name: str, value, low=None, high=None, *, open_low: bool = False) -> None:
    """``config.<name>`` must be a number (not a bool) in ``[low, high]`` (``(low, high]`` with
    ``open_low``; either bound None: unbounded).

    Raises:
      ValueError: naming ``config.<name>``, the value and the expected range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config.{name} must be a number; got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"config.{name} must be {'>' if open_low else '>='} {low}; "
                         f"got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"config.{name} must be <= {high}; got {value!r}")


def config_int(name: str, value, low: int = 1) -> None:
    """``config.<name>`` must be an int (not a bool) ``>= low``.

    Raises:
      ValueError: naming ``config.<name>``, the value and the bound.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.{name} must be an int >= {low}; got {value!r}")

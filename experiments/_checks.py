"""Config checks shared by the experiment modules: a value (or sequence of values) of the right
kind and range, or a ValueError naming the config key, what it got and what it expects."""

from __future__ import annotations

import numpy as np

__all__ = ["as_tuple", "int_values"]


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

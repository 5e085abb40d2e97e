"""Reading ``state_dict()["newt"]`` back: each value checked, with an error that says which and why.

A checkpoint that loads must not poison later steps (a NaN rate, a snapshot of another model's
shapes), so every part that owns a fragment reads it through these checks. They raise
``ValueError`` naming the entry, the value and what it must be.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["CheckpointError", "count", "flag", "number", "numbers_list", "rates", "tensor"]


class CheckpointError(ValueError):
    """A checkpoint's ``"newt"`` entry holds a value ``Newt`` cannot resume from."""


def _fail(key: str, value: Any, must: str) -> CheckpointError:
    shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    return CheckpointError(
        f"the checkpoint's newt.{key} is {shown}: it must be {must}. Load a state_dict saved by Newt "
        "over the same parameters (an edited or corrupted checkpoint cannot be resumed from)."
    )


def flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "True or False")
    return value


def count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise _fail(key, value, "an integer >= 0")
    return int(value)


def number(value: Any, key: str, *, low: float = -math.inf, optional: bool = False, finite: bool = True) -> Any:
    """A real number >= ``low`` (finite unless ``finite=False``), or None when ``optional``."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or math.isnan(value)
        or (finite and not math.isfinite(value))
        or value < low
    ):
        bound = "" if low == -math.inf else f" >= {low:g}"
        raise _fail(key, value, f"a {'finite ' if finite else ''}number{bound}{' or None' if optional else ''}")
    return float(value)


def numbers_list(value: Any, key: str, *, length: int | None = None, low: float = -math.inf) -> list[float]:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise _fail(key, value, f"a list of {length if length is not None else 'some'} numbers")
    return [number(v, key, low=low) for v in value]


def tensor(value: Any, key: str, *, shape: Sequence[int] | None = None, optional: bool = False) -> Any:
    """A floating-point tensor (of ``shape``, if given) with finite entries, or None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise _fail(key, value, "a floating-point tensor")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise _fail(key, value, f"a tensor of shape {tuple(shape)}")
    if not bool(torch.isfinite(value).all()):
        raise _fail(key, value, "finite")
    return value


def rates(saved: Any, n_groups: int) -> list[list[float]]:
    """The rates of a checkpoint: per group the adapted rate, the scheduler's factor and the rate
    last written, finite and >= 0, one per param group, some adapted rate positive."""
    if not isinstance(saved, (list, tuple)) or len(saved) != n_groups:
        raise CheckpointError(
            f"the checkpoint's newt.rates has {len(saved) if isinstance(saved, (list, tuple)) else saved!r} "
            f"entries for {n_groups} param groups: load it into an optimizer over the same param groups."
        )
    rates = [numbers_list(rate, "rates", length=3, low=0.0) for rate in saved]
    if rates and max(rate[0] for rate in rates) <= 0.0:
        raise CheckpointError(
            f"the checkpoint's newt.rates are {rates}: every adapted rate is 0, so no step could "
            "move the parameters. Load a state_dict saved by Newt."
        )
    return rates

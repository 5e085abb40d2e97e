"""Scalar guards shared by every update rule (``docs/math.md``, "Guards").

Everything here works on plain Python floats: a rule sees a handful of
scalars per step, so float64 arithmetic on the host is exact enough and free.
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import NamedTuple


class Decision(str, enum.Enum):
    """Why a rule produced the rate it did.

    The values are plain strings, so they log and serialise as such.
    """

    def __str__(self) -> str:  # "spike", not "Decision.SPIKE", in f-strings and logs
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    NEWTON = "newton"
    """The rule's formula was applied as computed."""
    CLAMPED = "clamped"
    """The formula's result was limited by ``max_factor`` or by ``[alpha_min, alpha_max]``."""
    NONCONVEX = "nonconvex"
    """The curvature denominator was not safely positive (this includes a zero
    direction): the rate was kept."""
    NONFINITE = "nonfinite"
    """A measured number (or the current rate) was NaN or infinite: the rate was shrunk."""
    PLAIN = "plain"
    """The step did not adapt the rate: a plain inner step (lazy updates, a closure-free step
    inside a block, or a rate that a scheduler set to zero)."""
    VANISHED = "vanished"
    """The step did not change the parameters at all (it vanished in their floating-point
    precision) although the gradient is not zero: the rate was too small to measure anything,
    so it grew by ``max_factor``."""
    LINEAR = "linear"
    """The curvature was below measurement noise while the loss went down along a nearly
    straight line (the slope changed by less than a tenth over the step): the step was far too
    small to see the minimum, so the rate grew by ``max_factor`` instead of being kept."""
    SPIKE = "spike"
    """The lookahead loss rose far above the starting loss (the step overshot): the rate was
    shrunk, as after a non-finite measurement."""
    ASCENT = "ascent"
    """The step's direction rose on its own batch (``d0 < 0``), and the rule's shrink was not
    applied: the rate was kept (lookahead mode; see :func:`newt.rules.held_on_ascent`)."""
    INSUFFICIENT = "insufficient"
    """The initial rate was still unproven and the step fell short of Armijo's sufficient
    decrease (its loss fell by less than ``start_armijo`` times what its slope predicted): the
    step was undone and the rate shrunk (see ``Newt``'s ``start_armijo``)."""


class Proposal(NamedTuple):
    """What a rule returns: the next rate and the reason for it."""

    alpha: float
    decision: Decision


def all_finite(*values: float) -> bool:
    """Return True when every value is a finite number."""
    return all(math.isfinite(v) for v in values)


def guarded_ratio(numerator: float, denominator: float, scale: float, eps: float) -> float | None:
    """Return ``numerator / denominator``, or None when the denominator is not safely positive.

    "Safely positive" is scale-free: ``denominator > eps * scale``, where
    ``scale`` is a magnitude of the same units as the denominator (the rules
    pass ``|D0| + |D1|``). With ``scale == 0`` (a zero direction) every
    denominator fails, so no division by zero ever happens. The quotient may
    overflow to an infinity; the clamps downstream absorb it.
    """
    if not (scale > 0.0 and denominator > eps * scale):
        return None
    return numerator / denominator


def clamp_alpha(alpha: float, alpha_min: float, alpha_max: float) -> float:
    """Clamp a rate into ``[alpha_min, alpha_max]``; NaN maps to ``alpha_min``."""
    if math.isnan(alpha):
        return alpha_min
    return min(max(alpha, alpha_min), alpha_max)


def bounded(alpha: float, proposed: float, *, alpha_min: float, alpha_max: float, max_factor: float) -> Proposal:
    """Apply the factor clamp, then the rate clamp, to a proposed rate.

    The factor clamp keeps ``proposed / alpha`` in ``[1/max_factor, max_factor]``
    (which also turns a non-positive proposal into ``alpha / max_factor``); the
    rate clamp then keeps the result in ``[alpha_min, alpha_max]``, which wins
    if the two disagree. The decision is ``NEWTON`` when nothing was clipped.
    """
    if math.isnan(proposed):
        return shrunk(alpha, 1.0 / max_factor, alpha_min=alpha_min, alpha_max=alpha_max)
    result = min(max(proposed, alpha / max_factor), alpha * max_factor)
    result = clamp_alpha(result, alpha_min, alpha_max)
    return Proposal(result, Decision.NEWTON if result == proposed else Decision.CLAMPED)


def kept(alpha: float, *, alpha_min: float, alpha_max: float) -> Proposal:
    """Keep the current rate (clamped into bounds): the non-convex fallback."""
    return Proposal(clamp_alpha(alpha, alpha_min, alpha_max), Decision.NONCONVEX)


def shrunk(
    alpha: float,
    factor: float,
    *,
    alpha_min: float,
    alpha_max: float,
    decision: Decision = Decision.NONFINITE,
) -> Proposal:
    """Multiply the rate by ``factor`` (< 1) after a non-finite measurement or a loss spike.

    A current rate that is itself NaN or not positive has no meaningful
    multiple, so it restarts from ``alpha_min``.
    """
    if math.isnan(alpha) or alpha <= 0.0:
        return Proposal(alpha_min, decision)
    return Proposal(clamp_alpha(alpha * factor, alpha_min, alpha_max), decision)


def check_real(
    name: str, value: object, *, low: float, high: float, low_open: bool, high_open: bool, hint: str
) -> float:
    """Validate one real hyperparameter and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}. {hint}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}. {hint}")
    return value

"""The learning-rate update rules: pure functions of five scalars (SPEC sections 3-4).

Every rule has the signature::

    rule(alpha, f0, f1, d0, d1, options) -> Proposal(alpha_next, decision)

with, for the step just taken from ``theta`` to ``theta_next = theta - d``:

- ``alpha``: the rate that step used;
- ``f0 = L(theta)`` and ``f1 = L(theta_next)``: the loss before and at the lookahead point;
- ``d0 = <grad L(theta), d>`` and ``d1 = <grad L(theta_next), d>``.

On a quadratic line ``g(a) = c - b a + h a^2 / 2`` (``h > 0``) the measured numbers are
``f0 = c``, ``f1 = g(alpha)``, ``d0 = alpha b`` and ``d1 = alpha (b - h alpha)``, and every
undamped rule returns the line minimiser ``b / h``.

Rules never divide by a denominator that is not safely positive, never return NaN or an
infinity, and always return a rate in ``[options.alpha_min, options.alpha_max]``. A custom rule
passed to :class:`newt.Newt` as ``strategy`` has the same signature; it may also return a bare
float, and Newt applies the same clamps to whatever it returns.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from newt._numerics import (
    Decision,
    Proposal,
    all_finite,
    bounded,
    guarded_ratio,
    kept,
    shrunk,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "STRATEGIES",
    "Decision",
    "Proposal",
    "Rule",
    "RuleOptions",
    "gen",
    "guard_custom_rule",
    "retsinas",
    "taylor",
]


def _check_real(
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


@dataclass(frozen=True)
class RuleOptions:
    """Hyperparameters shared by the rules, validated on construction.

    Attributes:
        gamma: Newton damping of ``retsinas`` and ``taylor``, in (0, 1]. ``1`` takes the full
            Newton step; smaller values move only part of the way, which tames mini-batch noise.
        smoothing: Moving-average coefficient beta of ``gen``, in [0, 1): ``alpha_next =
            beta * alpha + (1 - beta) * parabola_minimiser``. ``0`` jumps to the minimiser.
        alpha_min: Smallest rate ever returned, > 0.
        alpha_max: Largest rate ever returned, > ``alpha_min``.
        max_factor: Each update's multiplicative change is clamped to
            ``[1 / max_factor, max_factor]``; > 1. The default 2 takes 14 updates from 1e-5 to 1e-1;
            a larger cap (Retsinas et al. allow growth up to 100x) lets one noisy mini-batch
            measurement throw the rate far off.
        eps: Relative guard of every division: a curvature denominator counts as positive only
            when it exceeds ``eps * (|d0| + |d1|)``; >= 0. The comparison is scale-free, so
            multiplying the loss by a constant never changes a decision.
        nonfinite_shrink: Factor, in (0, 1), applied to the rate when a measured number is NaN
            or infinite (usually the lookahead stepped into an overflow: the rate was too big).
    """

    gamma: float = 0.5
    smoothing: float = 0.9
    alpha_min: float = 1e-10
    alpha_max: float = 1e4
    max_factor: float = 2.0
    eps: float = 1e-8
    nonfinite_shrink: float = 0.1

    def __post_init__(self) -> None:
        check = _check_real
        set_ = object.__setattr__  # frozen dataclass: normalise ints to floats once, here
        set_(
            self,
            "gamma",
            check(
                "gamma",
                self.gamma,
                low=0,
                high=1,
                low_open=True,
                high_open=False,
                hint="gamma is the Newton damping: use 1 for full steps, e.g. 0.5 to damp.",
            ),
        )
        set_(
            self,
            "smoothing",
            check(
                "smoothing",
                self.smoothing,
                low=0,
                high=1,
                low_open=False,
                high_open=True,
                hint="smoothing is GeN's moving-average coefficient: 0 for none, e.g. 0.9.",
            ),
        )
        set_(
            self,
            "alpha_min",
            check(
                "alpha_min",
                self.alpha_min,
                low=0,
                high=math.inf,
                low_open=True,
                high_open=True,
                hint="alpha_min is the smallest learning rate allowed, e.g. 1e-10.",
            ),
        )
        set_(
            self,
            "alpha_max",
            check(
                "alpha_max",
                self.alpha_max,
                low=0,
                high=math.inf,
                low_open=True,
                high_open=True,
                hint="alpha_max is the largest learning rate allowed, e.g. 1e4.",
            ),
        )
        if not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"alpha_min must be smaller than alpha_max, got alpha_min={self.alpha_min!r} "
                f"and alpha_max={self.alpha_max!r}. Swap them or widen the interval."
            )
        set_(
            self,
            "max_factor",
            check(
                "max_factor",
                self.max_factor,
                low=1,
                high=math.inf,
                low_open=True,
                high_open=True,
                hint="max_factor bounds each update's change, e.g. 2.",
            ),
        )
        set_(
            self,
            "eps",
            check(
                "eps",
                self.eps,
                low=0,
                high=1,
                low_open=False,
                high_open=True,
                hint="eps is a relative tolerance, e.g. 1e-8.",
            ),
        )
        set_(
            self,
            "nonfinite_shrink",
            check(
                "nonfinite_shrink",
                self.nonfinite_shrink,
                low=0,
                high=1,
                low_open=True,
                high_open=True,
                hint="nonfinite_shrink multiplies the rate after a NaN/inf, e.g. 0.1.",
            ),
        )


DEFAULT_OPTIONS = RuleOptions()

Rule = Callable[[float, float, float, float, float, RuleOptions], Proposal]


def _invalid_inputs(alpha: float, *measured: float) -> bool:
    return not (all_finite(alpha, *measured) and alpha > 0.0)


def _shrink(alpha: float, options: RuleOptions) -> Proposal:
    return shrunk(alpha, options.nonfinite_shrink, alpha_min=options.alpha_min, alpha_max=options.alpha_max)


def _keep(alpha: float, options: RuleOptions) -> Proposal:
    return kept(alpha, alpha_min=options.alpha_min, alpha_max=options.alpha_max)


def _bound(alpha: float, proposed: float, options: RuleOptions) -> Proposal:
    return bounded(
        alpha, proposed, alpha_min=options.alpha_min, alpha_max=options.alpha_max, max_factor=options.max_factor
    )


def _damped_newton(alpha: float, d1: float, curvature: float, scale: float, options: RuleOptions) -> Proposal:
    """``alpha * (1 + gamma * d1 / curvature)``, where ``curvature`` estimates ``alpha^2 w^T H w``.

    This is the Newton iteration ``alpha - gamma * g'(alpha) / g''(alpha)`` written with the
    measured numbers: ``g'(alpha) = -d1 / alpha`` and ``g''(alpha) ~ curvature / alpha^2``.
    """
    ratio = guarded_ratio(d1, curvature, scale, options.eps)
    if ratio is None:
        return _keep(alpha, options)
    return _bound(alpha, alpha * (1.0 + options.gamma * ratio), options)


def retsinas(
    alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS
) -> Proposal:
    """Newton step on the rate with curvature from the gradient difference.

    Retsinas, Sfikas, Filntisis, Maragos, "Newton-based trainable learning rate",
    ICASSP 2023, eq. 7-8, with damping ``gamma``::

        alpha_next = alpha * (1 + gamma * d1 / (d0 - d1))

    ``d0 - d1 ~ alpha^2 w^T H w`` is the curvature along the step. The loss values are not
    used, which is why this rule also works without a closure.
    """
    if _invalid_inputs(alpha, f0, f1, d0, d1):
        return _shrink(alpha, options)
    return _damped_newton(alpha, d1, d0 - d1, abs(d0) + abs(d1), options)


def taylor(
    alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS
) -> Proposal:
    """Newton step on the rate with curvature from a second-order Taylor expansion.

    Expanding the loss around the lookahead point and evaluating it at the start gives
    ``f0 ~ f1 + d1 + alpha^2 w^T H w / 2``, so ``alpha^2 w^T H w ~ 2 (f0 - f1 - d1)``::

        alpha_next = alpha * (1 + gamma * d1 / (2 (f0 - f1 - d1)))
    """
    if _invalid_inputs(alpha, f0, f1, d0, d1):
        return _shrink(alpha, options)
    return _damped_newton(alpha, d1, 2.0 * (f0 - f1 - d1), abs(d0) + abs(d1), options)


def gen(alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS) -> Proposal:
    """Generalized Newton's method: jump to a fitted parabola's minimiser, then smooth.

    Bu and Xu, "Automatic gradient descent with generalized Newton's method", 2024. The
    parabola through ``g(0) = f0``, ``g'(0) = -d0 / alpha`` and ``g(alpha) = f1`` has its
    minimum at::

        delta = alpha * d0 / (2 (f1 - f0 + d0))
        alpha_next = smoothing * alpha + (1 - smoothing) * delta

    When the parabola is not convex (denominator not safely positive) the rate is kept.
    ``d1`` is not used, except in the scale of the guard.
    """
    if _invalid_inputs(alpha, f0, f1, d0, d1):
        return _shrink(alpha, options)
    ratio = guarded_ratio(d0, 2.0 * (f1 - f0 + d0), abs(d0) + abs(d1), options.eps)
    if ratio is None:
        return _keep(alpha, options)
    beta = options.smoothing
    return _bound(alpha, beta * alpha + (1.0 - beta) * alpha * ratio, options)


STRATEGIES: Mapping[str, Rule] = {"retsinas": retsinas, "taylor": taylor, "gen": gen}


def guard_custom_rule(rule: Callable[..., object]) -> Rule:
    """Wrap a user's rule so that its output obeys the same guarantees as the built-in rules.

    The wrapped rule may return a :class:`Proposal`, an ``(alpha, decision)`` pair or a bare
    float. A result that is not a finite number counts as a non-finite measurement (the rate
    shrinks); a finite one goes through the factor and rate clamps.
    """

    def guarded(
        alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS
    ) -> Proposal:
        result = rule(alpha, f0, f1, d0, d1, options)
        decision = None
        if isinstance(result, tuple):
            result, decision = result
        if isinstance(result, bool) or not isinstance(result, numbers.Real):
            raise TypeError(
                f"the custom strategy {getattr(rule, '__name__', rule)!r} returned {result!r}; a rule "
                "must return a float, an (alpha, decision) pair or a newt.rules.Proposal."
            )
        if _invalid_inputs(alpha) or not math.isfinite(result):
            return _shrink(alpha, options)
        proposal = _bound(alpha, float(result), options)
        if decision is not None and proposal.decision is Decision.NEWTON:
            return Proposal(proposal.alpha, Decision(decision))
        return proposal

    guarded.__name__ = getattr(rule, "__name__", "custom")
    guarded.__doc__ = getattr(rule, "__doc__", None)
    return guarded

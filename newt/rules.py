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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from newt._numerics import (
    Decision,
    Proposal,
    all_finite,
    bounded,
    check_real,
    clamp_alpha,
    guarded_ratio,
    kept,
    shrunk,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "LOSS_FREE_STRATEGIES",
    "SLOPE_FORMS",
    "STRATEGIES",
    "Decision",
    "Proposal",
    "Rule",
    "RuleOptions",
    "gen",
    "gen_slopes",
    "grown_rate",
    "guard_custom_rule",
    "held_on_ascent",
    "next_batch_verdict",
    "retsinas",
    "scheduled_proposal",
    "shrunk_rate",
    "spike_guard",
    "sufficient_decrease",
    "taylor",
]


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
        shrink: Factor, in (0, 1), applied to the rate when a measured number is NaN
            or infinite (usually the lookahead stepped into an overflow: the rate was too big),
            and after a loss spike (see :func:`spike_guard`).
    """

    gamma: float = 0.5
    smoothing: float = 0.9
    alpha_min: float = 1e-10
    alpha_max: float = 1e4
    max_factor: float = 2.0
    eps: float = 1e-8
    shrink: float = 0.1

    def __post_init__(self) -> None:
        for name, (low, high, low_open, high_open, hint) in _OPTION_RANGES.items():
            # frozen dataclass: normalise ints to floats once, here
            value = check_real(
                name, getattr(self, name), low=low, high=high, low_open=low_open, high_open=high_open, hint=hint
            )
            object.__setattr__(self, name, value)
        if not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"alpha_min must be smaller than alpha_max, got alpha_min={self.alpha_min!r} "
                f"and alpha_max={self.alpha_max!r}. Swap them or widen the interval."
            )


# name -> (low, high, low end open, high end open, hint for the error message)
_OPTION_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "gamma": (0, 1, True, False, "gamma is the Newton damping: use 1 for full steps, e.g. 0.5 to damp."),
    "smoothing": (0, 1, False, True, "smoothing is GeN's moving-average coefficient: 0 for none, e.g. 0.9."),
    "alpha_min": (0, math.inf, True, True, "alpha_min is the smallest learning rate allowed, e.g. 1e-10."),
    "alpha_max": (0, math.inf, True, True, "alpha_max is the largest learning rate allowed, e.g. 1e4."),
    "max_factor": (1, math.inf, True, True, "max_factor bounds each update's change, e.g. 2."),
    "eps": (0, 1, False, True, "eps is a relative tolerance, e.g. 1e-8."),
    "shrink": (0, 1, True, True, "shrink multiplies the rate after a NaN/inf or a loss spike, e.g. 0.1."),
}


DEFAULT_OPTIONS = RuleOptions()

Rule = Callable[[float, float, float, float, float, RuleOptions], Proposal]


def _invalid_inputs(alpha: float, *measured: float) -> bool:
    return not (all_finite(alpha, *measured) and alpha > 0.0)


def shrunk_rate(alpha: float, options: RuleOptions, decision: Decision = Decision.NONFINITE) -> Proposal:
    """The rate after a fault: ``alpha * options.shrink``, clamped (``alpha_min`` if ``alpha`` is invalid)."""
    return shrunk(alpha, options.shrink, alpha_min=options.alpha_min, alpha_max=options.alpha_max, decision=decision)


def _keep(alpha: float, options: RuleOptions) -> Proposal:
    return kept(alpha, alpha_min=options.alpha_min, alpha_max=options.alpha_max)


def _bound(alpha: float, proposed: float, options: RuleOptions) -> Proposal:
    return bounded(
        alpha, proposed, alpha_min=options.alpha_min, alpha_max=options.alpha_max, max_factor=options.max_factor
    )


# Each rule reads one dimensionless ratio off the measured numbers (None when its curvature
# denominator is not safely positive), and turns it into a line-minimiser estimate ("target"):
# ``alpha * (1 + ratio)`` for the Newton rules, ``alpha * ratio`` for the parabola rules. The
# rules move a fraction of the way there; scheduled_proposal reuses the same ratios.


def _scale(d0: float, d1: float) -> float:
    return abs(d0) + abs(d1)


def _retsinas_ratio(f0: float, f1: float, d0: float, d1: float, eps: float) -> float | None:
    # d0 - d1 ~ alpha^2 w^T H w: the curvature along the step, from the gradient difference
    return guarded_ratio(d1, d0 - d1, _scale(d0, d1), eps)


def _taylor_ratio(f0: float, f1: float, d0: float, d1: float, eps: float) -> float | None:
    # f0 ~ f1 + d1 + alpha^2 w^T H w / 2 (second-order expansion around the lookahead point)
    return guarded_ratio(d1, 2.0 * (f0 - f1 - d1), _scale(d0, d1), eps)


def _gen_ratio(f0: float, f1: float, d0: float, d1: float, eps: float) -> float | None:
    # the parabola through g(0) = f0, g'(0) = -d0 / alpha and g(alpha) = f1
    return guarded_ratio(d0, 2.0 * (f1 - f0 + d0), _scale(d0, d1), eps)


def _gen_slopes_ratio(f0: float, f1: float, d0: float, d1: float, eps: float) -> float | None:
    # the parabola through the two slopes g'(0) = -d0 / alpha and g'(alpha) = -d1 / alpha
    return guarded_ratio(d0, d0 - d1, _scale(d0, d1), eps)


def _damped_newton(alpha: float, ratio: float | None, options: RuleOptions) -> Proposal:
    """``alpha * (1 + gamma * ratio)``, with ``ratio = d1 / curvature`` and ``curvature ~ alpha^2 w^T H w``.

    This is the Newton iteration ``alpha - gamma * g'(alpha) / g''(alpha)`` written with the
    measured numbers: ``g'(alpha) = -d1 / alpha`` and ``g''(alpha) ~ curvature / alpha^2``.
    """
    if ratio is None:
        return _keep(alpha, options)
    return _bound(alpha, alpha * (1.0 + options.gamma * ratio), options)


def _smoothed_parabola(alpha: float, ratio: float | None, options: RuleOptions) -> Proposal:
    """``smoothing * alpha + (1 - smoothing) * alpha * ratio``: toward the parabola's minimiser."""
    if ratio is None:
        return _keep(alpha, options)
    beta = options.smoothing
    return _bound(alpha, beta * alpha + (1.0 - beta) * alpha * ratio, options)


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
        return shrunk_rate(alpha, options)
    return _damped_newton(alpha, _retsinas_ratio(f0, f1, d0, d1, options.eps), options)


def taylor(
    alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS
) -> Proposal:
    """Newton step on the rate with curvature from a second-order Taylor expansion.

    Expanding the loss around the lookahead point and evaluating it at the start gives
    ``f0 ~ f1 + d1 + alpha^2 w^T H w / 2``, so ``alpha^2 w^T H w ~ 2 (f0 - f1 - d1)``::

        alpha_next = alpha * (1 + gamma * d1 / (2 (f0 - f1 - d1)))
    """
    if _invalid_inputs(alpha, f0, f1, d0, d1):
        return shrunk_rate(alpha, options)
    return _damped_newton(alpha, _taylor_ratio(f0, f1, d0, d1, options.eps), options)


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
        return shrunk_rate(alpha, options)
    return _smoothed_parabola(alpha, _gen_ratio(f0, f1, d0, d1, options.eps), options)


def gen_slopes(
    alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS
) -> Proposal:
    """GeN without loss values: the parabola's curvature from the gradient difference.

    The form of ``gen`` that needs no closure (SPEC section 7): the parabola through the two
    slopes ``g'(0) = -d0 / alpha`` and ``g'(alpha) = -d1 / alpha`` has its minimum at
    ``delta = alpha * d0 / (d0 - d1)``, and the rate moves there with smoothing::

        alpha_next = smoothing * alpha + (1 - smoothing) * alpha * d0 / (d0 - d1)

    (which is ``retsinas`` with ``gamma = 1 - smoothing``). ``f0`` and ``f1`` are not used, not
    even checked: in closure-free mode they are not measured.
    """
    if _invalid_inputs(alpha, d0, d1):
        return shrunk_rate(alpha, options)
    return _smoothed_parabola(alpha, _gen_slopes_ratio(f0, f1, d0, d1, options.eps), options)


STRATEGIES: Mapping[str, Rule] = {"retsinas": retsinas, "taylor": taylor, "gen": gen}

LOSS_FREE_STRATEGIES: Mapping[str, Rule] = {"retsinas": retsinas, "gen": gen_slopes}
"""The rules usable without loss values (closure-free mode, per-group rates), by strategy name.
``retsinas`` never reads ``f0``/``f1``; ``gen`` becomes :func:`gen_slopes`."""

SLOPE_FORMS: Mapping[Rule, Rule] = {retsinas: retsinas, taylor: retsinas, gen: gen_slopes, gen_slopes: gen_slopes}
"""Each built-in rule's form that reads only the slopes, for a step whose loss values say nothing:
``Newt`` applies it when the decrease the slope predicts is below the rounding of the loss values
(a tiny rate, a large loss offset, a low-precision loss), where ``f1 - f0`` is rounding alone.
``taylor`` with the curvature from the slopes, ``d0 - d1``, is ``retsinas``."""


# rule -> (its ratio, whether the ratio is a Newton increment or a parabola minimiser)
_RATIOS = {
    retsinas: (_retsinas_ratio, True),
    taylor: (_taylor_ratio, True),
    gen: (_gen_ratio, False),
    gen_slopes: (_gen_slopes_ratio, False),
}


def scheduled_proposal(
    rule: Rule, adapted: float, used: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions
) -> Proposal:
    """Adapt a rate that a scheduler multiplies: the step used ``used = m * adapted``.

    Every built-in rule moves the rate a fraction ``w`` (``gamma``, or ``1 - smoothing``) of the
    way to its estimate of the line minimiser, ``target``, which it reads off the step actually
    taken. With a scheduler multiplier ``m``, the step taken had size ``used``; the target comes
    from that step, and the adapted (unscheduled) rate moves toward it::

        adapted_next = adapted + w * (target - adapted)

    so that the rate used next, ``m' * adapted_next``, is the scheduler's factor times the rate
    ``Newt`` finds. With ``used == adapted`` this is the rule itself, up to rounding. The guards
    keep their meaning: a non-convex measurement keeps ``adapted``, a non-finite one shrinks it,
    and the factor and rate clamps apply to ``adapted``.
    """
    ratio_of, newton = _RATIOS[rule]
    measured = (f0, f1, d0, d1) if rule is not gen_slopes else (d0, d1)
    if _invalid_inputs(adapted, *measured) or not (math.isfinite(used) and used > 0.0):
        return shrunk_rate(adapted, options)
    ratio = ratio_of(f0, f1, d0, d1, options.eps)
    if ratio is None:
        return _keep(adapted, options)
    target = used * (1.0 + ratio) if newton else used * ratio
    weight = options.gamma if newton else 1.0 - options.smoothing
    # the convex-combination form, not adapted + w (target - adapted): with w = 1 it returns
    # target exactly, where the other form cancels adapted against itself
    return _bound(adapted, (1.0 - weight) * adapted + weight * target, options)


def grown_rate(alpha: float, options: RuleOptions, decision: Decision = Decision.VANISHED) -> Proposal:
    """The rate after a step too small to measure anything: ``alpha * options.max_factor``, clamped.

    Two cases, both told apart from a genuine "not convex" by ``Newt``, which records
    ``decision``. ``"vanished"``: a step ``d = alpha * w`` can round to exactly zero in every
    parameter while ``w`` is not zero (``alpha`` far below the parameters' relative precision);
    then ``D0 = D1 = 0`` and the rules, which see a zero direction, would keep ``alpha`` forever.
    ``"linear"``: the step went down a nearly straight line, its curvature below the resolution
    of the measurements, and the rules would keep ``alpha`` for as long as that lasts.
    """
    if not (math.isfinite(alpha) and alpha > 0.0):
        return Proposal(options.alpha_min, Decision.NONFINITE)
    return Proposal(clamp_alpha(alpha * options.max_factor, options.alpha_min, options.alpha_max), decision)


def sufficient_decrease(f0: float, f1: float, d0: float, armijo: float, resolution: float = 0.0) -> bool | None:
    """Armijo's sufficient-decrease test of one step, on the batch it was measured on.

    ``d0 = <grad L(theta), d>`` is the decrease the slope predicts for the step ``d``. The test
    passes (True) when the loss fell by at least ``armijo`` times that, ``f0 - f1 >= armijo * d0``,
    and fails (False) when it fell by less or rose. It does not apply (None) to a step that is not
    a descent direction (``d0 <= 0``), to a value that is not finite, or when the decrease to
    achieve, ``armijo * d0``, is below ``resolution``, the rounding error of the loss values (a
    step too small to move the loss by more than rounding cannot be judged by it).

    On a quadratic line with minimiser ``a*`` the share achieved is ``1 - alpha / (2 a*)``, so
    the test passes exactly for ``alpha <= 2 (1 - armijo) a*``. It is scale-free: multiplying
    the loss by ``c > 0`` multiplies ``f0 - f1`` and ``d0`` alike.
    """
    if not (all_finite(f0, f1, d0) and d0 > 0.0 and armijo * d0 >= resolution):
        return None
    return f0 - f1 >= armijo * d0


def next_batch_verdict(
    f0: float, f1: float, d0: float, armijo: float, threshold: float, resolution: float = 0.0
) -> bool | None:
    """The start-up test of a step judged on the next batch (closure-free mode, given the loss).

    ``f0`` is the loss of the step's batch before the step, ``f1`` the next batch's loss after
    it, ``d0`` the decrease the step's slope predicted. Two batches differ, so the Armijo
    condition ``f1 <= f0 - armijo * d0`` is given the tolerance of a loss spike: the step fails
    (False) when ``f1 > f0 + threshold * |f0| - armijo * max(d0, 0)``, a rise beyond the spike
    threshold or a fall short of the prediction by more than that tolerance (a far-too-large
    step predicts a decrease of many times the loss). It passes (True) when
    :func:`sufficient_decrease` holds, and is undecided (None) in between or when ``f0``,
    ``d0`` or ``f1`` is NaN or ``f0``, ``d0`` infinite (an infinite ``f1`` fails: the step blew
    the loss up). Scale-free, as both tests it combines.
    """
    if not all_finite(f0, d0) or math.isnan(f1):
        return None
    allowed = f0 + threshold * abs(f0) - armijo * max(d0, 0.0)
    if f1 > allowed:  # +inf fails; threshold inf allows anything finite
        return False
    return True if sufficient_decrease(f0, f1, d0, armijo, resolution) else None


def blew_up(first: float, f: float, threshold: float) -> bool:
    """Whether a batch's loss ``f`` rose above the run's first loss ``first`` by more than
    ``threshold * |first|`` (closure-free mode given the loss, after the start).

    Single batches late in training differ too much to judge a step by the previous one, but a
    healthy run does not climb back above where it started: a run whose rate grew too large
    does (around SGD with momentum from a start that passed the start-up test; ``gen``'s slow
    decrease after an overshoot). An infinite ``f`` blew up; a NaN ``f`` or a non-finite
    ``first`` says nothing (False). Scale-free; ``threshold`` may be ``math.inf`` (off).
    """
    if not math.isfinite(first) or math.isnan(f) or math.isinf(threshold):
        return False
    return f > first + threshold * abs(first)


def rose_sharply(recent: Sequence[float], f: float, threshold: float) -> bool:
    """Whether a batch's loss ``f`` rose above the largest of the recent batch losses ``recent``
    by more than ``threshold`` times its size (lazy mode, on a plain step).

    Lazy mode's plain steps run unmeasured at the rate the last lookahead step tested; an
    instability that builds up over a few of them (in the benchmarks: Adam late in training, at
    a rate that has grown) shows as a batch loss well above every recent one, and
    the optimizer then measures that step as a lookahead step, which can undo it. Batch losses
    scatter, so the comparison is with the largest recent loss and the threshold is wide.
    Non-finite entries of ``recent`` are skipped; without a finite one, or for a NaN ``f``,
    nothing is judged (False); an infinite ``f`` rose. Scale-free; ``threshold`` may be
    ``math.inf`` (off).
    """
    finite = [x for x in recent if math.isfinite(x)]
    return bool(finite) and blew_up(max(finite), f, threshold)


def spike_guard(alpha: float, f0: float, f1: float, threshold: float, options: RuleOptions) -> Proposal | None:
    """The loss-spike policy that ``Newt`` applies before any rule.

    A step whose lookahead loss rose by more than ``threshold * |f0|`` above the loss it
    started from (``threshold=1``: the loss more than doubled on the same batch) overshot the
    line far beyond its minimum. The Newton rules read such a step as "not convex" and would
    keep the rate; instead it shrinks by ``options.shrink`` (decision ``"spike"``). Returns
    None when there is no spike (or when a value is not finite: that is the rules' case).

    The test is scale-free: multiplying the loss by ``c > 0`` never changes it. ``threshold``
    may be ``math.inf``, which turns the policy off.
    """
    if not (all_finite(f0, f1) and f1 - f0 > threshold * abs(f0)):
        return None
    return shrunk_rate(alpha, options, Decision.SPIKE)


def held_on_ascent(alpha: float, d0: float, proposal: Proposal) -> Proposal:
    """The rate after a step whose direction went uphill on its own batch: not lowered.

    ``d0 = <grad L(theta), d> < 0`` means the inner optimizer's direction (its momentum, its
    preconditioner) rose along the batch it was measured on. The line's minimum then lies at a
    negative rate, every rule's target is below zero, and every rule lowers the rate (the Newton
    rules by the whole ``max_factor``, ``gen`` by its smoothing's share). That verdict is about
    the direction, not the step's size: once mini-batch noise dominates, or after a rejected
    spike left its gradient in Adam's moments, such steps come in runs, and each halved the rate
    (digits: from 0.2 to 2e-6 in a dozen steps, where it stayed). Returns
    ``Proposal(alpha, "ascent")`` when ``d0 < 0`` and ``proposal`` would lower ``alpha``;
    otherwise ``proposal`` unchanged. Only the sign of ``d0`` counts, so the test is scale-free.
    """
    if d0 < 0.0 and proposal.alpha < alpha:
        return Proposal(alpha, Decision.ASCENT)
    return proposal


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
            return shrunk_rate(alpha, options)
        proposal = _bound(alpha, float(result), options)
        if decision is not None and proposal.decision is Decision.NEWTON:
            return Proposal(proposal.alpha, Decision(decision))
        return proposal

    guarded.__name__ = getattr(rule, "__name__", "custom")
    guarded.__doc__ = getattr(rule, "__doc__", None)
    return guarded

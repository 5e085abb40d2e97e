"""The learning-rate update rules: pure functions of five scalars, and the table of the built-in ones.

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

:data:`RULES` is the one table of the built-in rules: for each, its function, the dimensionless
ratio it reads off the measurements, and its form that reads only the slopes. The mathematics
is in ``docs/math.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from newt._numerics import Decision, Proposal, all_finite, bounded, guarded_ratio, kept, shrunk
from newt.options import DEFAULT_OPTIONS, RuleOptions

__all__ = [
    "DEFAULT_OPTIONS",
    "RULES",
    "STRATEGIES",
    "Decision",
    "Proposal",
    "Rule",
    "RuleOptions",
    "RuleSpec",
    "gen",
    "gen_exact",
    "gen_slopes",
    "gen_three_point",
    "guard_custom_rule",
    "retsinas",
    "scheduled_proposal",
    "shrunk_rate",
    "taylor",
]


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


def _three_point_ratio(f0: float, f1: float, d0: float, d1: float, eps: float) -> float | None:
    # the parabola through g(-alpha) = f_back, g(0) = f0 and g(alpha) = f1, passed with its
    # curvature as d1 = d0 - C, C = f_back - 2 f0 + f1 (see RuleSpec.lookahead)
    curvature = d0 - d1
    return _three_point(f0, f1, curvature + 2.0 * f0 - f1, eps)


def _three_point(f0: float, f1: float, f_back: float, eps: float) -> float | None:
    curvature = f_back - 2.0 * f0 + f1
    return guarded_ratio(f_back - f1, 2.0 * curvature, 2.0 * (abs(f_back - f0) + abs(f1 - f0)), eps)


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

    The form of ``gen`` that needs no closure (``docs/math.md``, "The modes"): the parabola through the two
    slopes ``g'(0) = -d0 / alpha`` and ``g'(alpha) = -d1 / alpha`` has its minimum at
    ``delta = alpha * d0 / (d0 - d1)``, and the rate moves there with smoothing::

        alpha_next = smoothing * alpha + (1 - smoothing) * alpha * d0 / (d0 - d1)

    (which is ``retsinas`` with ``gamma = 1 - smoothing``). ``f0`` and ``f1`` are not used, not
    even checked: in closure-free mode they are not measured.
    """
    if _invalid_inputs(alpha, d0, d1):
        return shrunk_rate(alpha, options)
    return _smoothed_parabola(alpha, _gen_slopes_ratio(f0, f1, d0, d1, options.eps), options)


def gen_exact(alpha: float, d0: float, curvature: float, options: RuleOptions = DEFAULT_OPTIONS) -> Proposal:
    """Exact GeN: the minimiser of the local quadratic with the curvature of a Hessian-vector product.

    Bu and Xu, "Automatic gradient descent with generalized Newton's method", 2024, the exact
    version. With the step ``d = alpha * w`` and the Hessian ``H`` at ``theta_t``, the quadratic
    ``g(a) = f0 - (d0 / alpha) a + (curvature / alpha^2) a^2 / 2`` with ``curvature = d^T H d``
    has its minimum at ``delta = alpha * d0 / curvature = <grad L, w> / (w^T H w)``::

        alpha_next = smoothing * alpha + (1 - smoothing) * delta

    When the curvature is not safely positive the rate is kept. This is ``gen_slopes`` with the
    exact ``d^T H d`` in place of the gradient difference ``d0 - d1``. The strategy
    ``"gen-exact"`` (``STRATEGIES["gen-exact"]``) is this rule in the five-scalar form every rule
    has, with the curvature passed as ``d1 = d0 - curvature``; pass the name, not this function,
    as ``Newt``'s strategy.
    """
    if _invalid_inputs(alpha, d0, curvature):
        return shrunk_rate(alpha, options)
    d1 = d0 - curvature  # the slope at the lookahead point on that quadratic
    return _smoothed_parabola(alpha, _gen_slopes_ratio(0.0, 0.0, d0, d1, options.eps), options)


def gen_three_point(
    alpha: float, f0: float, f1: float, f_back: float, options: RuleOptions = DEFAULT_OPTIONS
) -> Proposal:
    """Backpropagation-free GeN: the parabola through three loss values along the step.

    Bu and Xu (2024), the approximate version. With ``f1 = L(theta - d)`` (the lookahead
    point), ``f0 = L(theta)`` and ``f_back = L(theta + d)``, the parabola through the three
    has its minimum at::

        delta = (alpha / 2) (f_back - f1) / (f_back - 2 f0 + f1)
        alpha_next = smoothing * alpha + (1 - smoothing) * delta

    When the parabola is not convex (``f_back - 2 f0 + f1`` not safely positive against the
    two changes ``|f_back - f0| + |f1 - f0|``) the rate is kept. No slope is read. The strategy
    ``"gen-three-point"`` is this rule in the five-scalar form, with the fit's curvature passed
    as ``d1 = d0 - (f_back - 2 f0 + f1)``; pass the name, not this function, as the strategy.
    """
    if _invalid_inputs(alpha, f0, f1, f_back):
        return shrunk_rate(alpha, options)
    return _smoothed_parabola(alpha, _three_point(f0, f1, f_back, options.eps), options)


def _gen_exact_rule(
    alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS
) -> Proposal:
    return gen_exact(alpha, d0, d0 - d1, options)


def _three_point_rule(
    alpha: float, f0: float, f1: float, d0: float, d1: float, options: RuleOptions = DEFAULT_OPTIONS
) -> Proposal:
    if _invalid_inputs(alpha, f0, f1, d0, d1):
        return shrunk_rate(alpha, options)
    return _smoothed_parabola(alpha, _three_point_ratio(f0, f1, d0, d1, options.eps), options)


_gen_exact_rule.__name__, _three_point_rule.__name__ = "gen_exact", "gen_three_point"

Ratio = Callable[[float, float, float, float, float], float | None]


@dataclass(frozen=True)
class RuleSpec:
    """A rule and what ``Newt`` needs to know about it.

    Attributes:
        name: The rule's name (a strategy name, or the custom rule's function name).
        rule: The function, with the signature of :data:`Rule`.
        ratio: The dimensionless ratio the rule reads off the measurements (None when its
            curvature denominator is not safely positive); None for a custom rule.
        newton: Whether the ratio is a Newton increment (the line-minimiser estimate is
            ``alpha * (1 + ratio)``) or a parabola minimiser (``alpha * ratio``).
        reads_losses: Whether the rule reads ``f0`` and ``f1``.
        slope_form: The name of the rule's form that reads only the slopes: ``Newt`` uses it on
            a step whose predicted change is below the rounding of the loss values, where
            ``f1 - f0`` is rounding alone. None for a custom rule, and for a rule whose step
            measures no slope at the lookahead point: such a step measured nothing, and the
            rate grows by ``max_factor`` (``"linear"``).
        loss_free: The name of the rule a strategy of this name applies where no loss values
            are measured (closure-free steps, per-group rates); None where it has none.
        lookahead: What a closure step measures besides ``f0`` and ``d0`` (``docs/math.md``,
            "What a step measures"): ``"gradient"``, the loss and the gradient at the lookahead
            point (``d1``); ``"loss"``, the loss there only (forward only); ``"three-point"``,
            the loss there and at ``theta + d`` (forward only); ``"hessian"``, the loss there
            (forward only) and ``d^T H d`` at ``theta_t`` (a Hessian-vector product). Where
            ``d1`` is not measured the step passes the rule ``d1 = d0 - C``, the slope at the
            lookahead point of the parabola it measured, whose curvature is ``C``.
    """

    name: str
    rule: Rule
    ratio: Ratio | None = None
    newton: bool = True
    reads_losses: bool = True
    slope_form: str | None = None
    loss_free: str | None = None
    lookahead: str = "gradient"

    @property
    def builtin(self) -> bool:
        return self.ratio is not None


RULES: Mapping[str, RuleSpec] = {
    "retsinas": RuleSpec("retsinas", retsinas, _retsinas_ratio, True, False, "retsinas", "retsinas"),
    # taylor with the curvature from the slopes, d0 - d1, is retsinas
    "taylor": RuleSpec("taylor", taylor, _taylor_ratio, True, True, "retsinas", None),
    "gen": RuleSpec("gen", gen, _gen_ratio, False, True, "gen-slopes", "gen-slopes"),
    "gen-slopes": RuleSpec("gen-slopes", gen_slopes, _gen_slopes_ratio, False, False, "gen-slopes", "gen-slopes"),
    # the curvature of a Hessian-vector product is exact at any step length: it is its own slope form
    "gen-exact": RuleSpec("gen-exact", _gen_exact_rule, _gen_slopes_ratio, False, False, "gen-exact", None, "hessian"),
    "gen-three-point": RuleSpec(
        "gen-three-point", _three_point_rule, _three_point_ratio, False, True, None, None, "three-point"
    ),
}
"""The built-in rules by name: the one table every other view of them is read from."""

STRATEGIES: Mapping[str, Rule] = {
    name: RULES[name].rule for name in ("retsinas", "taylor", "gen", "gen-exact", "gen-three-point")
}
"""The strategies a user names, and their rules (``"auto"`` picks among them per step)."""

_ENTRY_OF = {spec.rule: spec for spec in RULES.values()}


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
    spec = _ENTRY_OF[rule]
    measured = (f0, f1, d0, d1) if rule is not gen_slopes else (d0, d1)
    if _invalid_inputs(adapted, *measured) or not (math.isfinite(used) and used > 0.0):
        return shrunk_rate(adapted, options)
    ratio = spec.ratio(f0, f1, d0, d1, options.eps)
    if ratio is None:
        return _keep(adapted, options)
    target = used * (1.0 + ratio) if spec.newton else used * ratio
    weight = options.gamma if spec.newton else 1.0 - options.smoothing
    # the convex-combination form, not adapted + w (target - adapted): with w = 1 it returns
    # target exactly, where the other form cancels adapted against itself
    return _bound(adapted, (1.0 - weight) * adapted + weight * target, options)


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

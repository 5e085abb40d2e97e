"""The decision of a step: guards, then the rule per rate unit, then the adjusters. Pure.

:func:`decide` reads the reduced measurements and the rates and writes nothing: the mode that
called it commits what it returns. The order is ``docs/math.md``'s: the guards concern the
whole step (non-finite numbers, a loss spike, the start-up test) and may end it; then each
unit's rule sees the measurements without their estimated noise share; then the adjusters
correct what the rules cannot see (a step that vanished in floating point, a nearly linear
descent, an uphill direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from newt._noise import debiased
from newt._numerics import Decision, Proposal, all_finite, clamp_alpha
from newt._rates import GroupRate
from newt.options import RuleOptions
from newt.policies import (
    AscentHold,
    NonfiniteCheck,
    SpikeTest,
    grown_rate,
    loss_resolution,
    nearly_linear,
    sufficient_decrease,
)
from newt.rules import RULES, RuleSpec, scheduled_proposal, shrunk_rate

__all__ = ["Checks", "Measured", "Verdict", "decide", "shrunk"]


class Measured(NamedTuple):
    """A step's reduced measurements: the losses (None where not measured) and, per unit, the slopes."""

    f0: float | None
    f1: float | None
    d0s: list[float]
    d1s: list[float]


class Verdict(NamedTuple):
    """What :func:`decide` returns.

    Attributes:
        proposals: The next adapted rate of each unit, with its reason.
        rejected: Whether to undo the step.
        proven: Whether the step passed the start-up test.
    """

    proposals: list[Proposal]
    rejected: bool
    proven: bool = False


@dataclass(frozen=True)
class Checks:
    """The policies :func:`decide` applies, and the options of the rules."""

    options: RuleOptions
    nonfinite: NonfiniteCheck
    spike: SpikeTest
    ascent: AscentHold
    armijo: float
    scaled: bool  # a GradScaler scales the lookahead's gradients: an overflow there loses only the measurement


_GO_ON = Verdict([], False)
"""What the guards return when the step goes on to the rules."""


def shrunk(rates: Sequence[GroupRate], options: RuleOptions, decision: Decision) -> list[Proposal]:
    """Every unit's adapted rate cut by ``shrink``, with ``decision`` as the reason."""
    return [shrunk_rate(rate.adapted, options, decision) for rate in rates]


def decide(
    measured: Measured,
    rates: Sequence[GroupRate],
    noise: Sequence[float],
    rule: RuleSpec,
    checks: Checks,
    *,
    probation: bool,
    loss_eps: float = 0.0,
    hold_ascents: bool = False,
    gradient_nonzero: Callable[[int], bool],
) -> Verdict:
    """The next adapted rate of each unit, and whether to undo the step.

    Args:
        measured: The reduced measurements; ``f0``/``f1`` are None in closure-free mode.
        rates: Each unit's rate (the adapted one, and the one the step used).
        noise: Each unit's estimated noise share of ``d0`` (zeros without the correction).
        rule: The rule to apply.
        checks: The policies and the rules' options.
        probation: The initial rate has not passed the start-up test yet.
        loss_eps: The relative rounding unit of the loss values.
        hold_ascents: Keep the rate after an uphill step (lookahead mode, built-in rules).
        gradient_nonzero: ``unit -> bool``, asked only when a unit's step vanished exactly:
            whether its gradient is nonzero (a query; it changes nothing).
    """
    f0, f1, d0s, d1s = measured
    options = checks.options
    resolution = 0.0 if f0 is None or not all_finite(f0, f1) else loss_resolution(loss_eps, f0, f1)
    verdict = _guards(measured, rates, checks, probation, resolution)
    if verdict.rejected or verdict.proposals:
        return verdict
    proposals = []
    for unit, (rate, d0, d1, share) in enumerate(zip(rates, d0s, d1s, noise)):
        if rate.used <= 0.0:  # a scheduler took the rate to zero: the step measured nothing
            proposals.append(Proposal(rate.adapted, Decision.PLAIN))
            continue
        proposal, seen = _rule_proposal(rule, rate, measured, d0, d1, share, resolution, options)
        if proposal.decision is Decision.NONCONVEX:
            nonzero = lambda u=unit: gradient_nonzero(u)  # noqa: E731
            proposal = _too_short(proposal, rate, rule, d0, d1, f0, seen, nonzero, options)
        if hold_ascents:
            proposal = checks.ascent.applied(rate.adapted, d0, proposal)
        proposals.append(proposal)
    return Verdict(proposals, False, verdict.proven)


def _guards(
    measured: Measured, rates: Sequence[GroupRate], checks: Checks, probation: bool, resolution: float
) -> Verdict:
    """The checks of the whole step, before any rule: a verdict with proposals ends the step.

    Non-finite numbers shrink the rate (or, when only the lookahead's scaled gradients
    overflowed, keep it); a loss spike shrinks it; a start that fails the start-up test is
    undone. Otherwise the verdict has no proposals, and says whether the start passed.
    """
    f0, f1, d0s, d1s = measured
    options = checks.options
    losses_finite = f0 is None or all_finite(f0, f1)
    if not (all_finite(*d0s, *d1s) and losses_finite):
        if checks.scaled and all_finite(*d0s) and losses_finite:
            # Only the lookahead's scaled gradients overflowed: the step itself is sound (its
            # loss is finite), the measurement is lost. Keep the step and the rate.
            return Verdict([Proposal(rate.adapted, Decision.NONFINITE) for rate in rates], False)
        return Verdict(shrunk(rates, options, Decision.NONFINITE), checks.nonfinite.reject)
    if f0 is None:
        return _GO_ON
    if checks.spike.fires(f0, f1):
        return Verdict(shrunk(rates, options, Decision.SPIKE), checks.spike.reject)
    if not probation:
        return _GO_ON
    # the raw d0, not the noise-corrected one: the test asks what this batch's line did
    passed = sufficient_decrease(f0, f1, math.fsum(d0s), checks.armijo, resolution)
    if passed is False:
        return Verdict(shrunk(rates, options, Decision.INSUFFICIENT), True)
    return Verdict([], False, passed is True)


def _rule_proposal(
    rule: RuleSpec,
    rate: GroupRate,
    measured: Measured,
    d0: float,
    d1: float,
    share: float,
    resolution: float,
    options: RuleOptions,
) -> tuple[Proposal, tuple[float, float, float | None]]:
    """The rule's proposal for one unit, and the slopes and lookahead loss the adjusters judge."""
    f0, f1 = measured.f0, measured.f1
    f0_, f1_ = (0.0, 0.0) if f0 is None else (f0, f1)  # loss-free rules never read them
    f1_unit, d0_unit, d1_unit = debiased(f1_, d0, d1, share) if share else (f1_, d0, d1)
    unit_rule, f1_seen = rule, f1
    if rule.builtin and abs(d0) <= resolution:
        # The step's predicted change is below the loss values' rounding, so f1 - f0 may be
        # rounding alone: gen read f1 == f0 as a parabola with its minimum at alpha / 2 and
        # halved a tiny start forever. The slopes still measure the line, where the step
        # measured one at the lookahead point; where it did not and the losses did not move
        # beyond their rounding either, it measured nothing.
        if rule.slope_form is None:
            if _losses_unmoved(rule, f0_, f1_, d0, d1, resolution):
                return _unresolved(rate, d0, options), (d0_unit, d1_unit, f0)
        else:
            unit_rule, f1_seen = RULES[rule.slope_form], f0
    if rate.multiplier == 1.0:
        proposal = unit_rule.rule(rate.adapted, f0_, f1_unit, d0_unit, d1_unit, options)
    elif unit_rule.builtin:
        proposal = scheduled_proposal(unit_rule.rule, rate.adapted, rate.used, f0_, f1_unit, d0_unit, d1_unit, options)
    else:  # a custom rule adapts the rate it saw used; the multiplier is taken back out
        proposal = unit_rule.rule(rate.used, f0_, f1_unit, d0_unit, d1_unit, options)
        alpha = clamp_alpha(proposal.alpha / rate.multiplier, options.alpha_min, options.alpha_max)
        proposal = Proposal(alpha, proposal.decision)
    return proposal, (d0_unit, d1_unit, f1_seen)


def _losses_unmoved(rule: RuleSpec, f0: float, f1: float, d0: float, d1: float, resolution: float) -> bool:
    """Whether every loss the step measured is within rounding of ``f0`` (the three-point fit's
    ``f_back - f0`` is ``C + f0 - f1``, with its curvature passed as ``C = d0 - d1``)."""
    changes = [f1 - f0]
    if rule.lookahead == "three-point":
        changes.append(d0 - d1 + f0 - f1)
    return all(abs(change) <= resolution for change in changes)


def _unresolved(rate: GroupRate, d0: float, options: RuleOptions) -> Proposal:
    """A step that measured no slope at the lookahead point, too short for its losses to move.

    A descent grows the rate (``"linear"``): nothing was measured. Otherwise the rate is kept
    (``"nonconvex"``), and a step that did not move at all is the adjusters' case.
    """
    if d0 > 0.0:
        return grown_rate(rate.adapted, options, Decision.LINEAR)
    return Proposal(clamp_alpha(rate.adapted, options.alpha_min, options.alpha_max), Decision.NONCONVEX)


def _too_short(
    proposal: Proposal,
    rate: GroupRate,
    rule: RuleSpec,
    d0: float,
    d1: float,
    f0: float | None,
    seen: tuple[float, float, float | None],
    gradient_nonzero: Callable[[], bool],
    options: RuleOptions,
) -> Proposal:
    """A "nonconvex" proposal from a step too short to measure any curvature grows the rate."""
    if d0 == 0.0 and d1 == 0.0 and gradient_nonzero():
        # d = 0 exactly: theta did not move, and these are the gradients of theta_t
        return grown_rate(rate.adapted, options)
    d0_unit, d1_unit, f1_seen = seen
    # a custom rule's "nonconvex" is its own choice
    if rule.builtin and nearly_linear(d0_unit, d1_unit, f0, f1_seen):
        return grown_rate(rate.adapted, options, Decision.LINEAR)
    return proposal

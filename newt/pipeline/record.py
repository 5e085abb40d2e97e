"""The last stage of a step: the new rates, the counters and ``StepInfo``, into the step's state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from newt._numerics import Decision, Proposal
from newt._state import State
from newt.pipeline.decide import Measured
from newt.step_info import GroupStepInfo, StepInfo

__all__ = ["record", "record_plain", "set_adapted"]


def set_adapted(
    state: State,
    param_groups: Sequence[dict[str, Any]],
    per_group: bool,
    unit_groups: Sequence[int],
    alphas: Sequence[float],
) -> None:
    """Give each unit its new adapted rate (one global rate: scale every group) and write the rates."""
    if per_group:
        for g, alpha in zip(unit_groups, alphas):
            state.rates.groups[g].adapted = alpha
    else:
        state.rates.scale_all(unit_groups[0], alphas[0])
    state.rates.write(param_groups)


def record(
    state: State,
    param_groups: Sequence[dict[str, Any]],
    per_group: bool,
    measured: Measured,
    unit_groups: Sequence[int],
    proposals: Sequence[Proposal],
    *,
    rejected: bool,
    noise: Sequence[float] | None = None,
) -> None:
    """A step that decided the rates: write them, count the step, describe it in ``state.info``.

    ``measured``'s losses are the numbers ``StepInfo`` reports (NaN where not measured).
    """
    rates = state.rates.groups
    noise = noise or [0.0] * len(unit_groups)
    before = [rate.used for rate in rates]
    state.deferred = None  # a newer decision supersedes a held-back increase
    set_adapted(state, param_groups, per_group, unit_groups, [p.alpha for p in proposals])
    after = [rate.used for rate in rates]
    reference = max(range(len(unit_groups)), key=lambda u: before[unit_groups[u]])
    f0, f1, d0s, d1s = measured
    groups = None
    if per_group:
        groups = tuple(
            GroupStepInfo(g, d0, d1, before[g], after[g], p.decision, share)
            for g, d0, d1, p, share in zip(unit_groups, d0s, d1s, proposals, noise)
        )
    state.info = StepInfo(
        f0,
        f1,
        math.fsum(d0s),
        math.fsum(d1s),
        before[unit_groups[reference]],
        after[unit_groups[reference]],
        proposals[reference].decision,
        rejected,
        groups,
        noise[reference],
    )
    state.steps += 1
    state.rejected += int(rejected)


def record_plain(
    state: State, param_groups: Sequence[dict[str, Any]], per_group: bool, update_every: int, f0: float
) -> None:
    """A step that did not adapt the rate: count it; a held-back increase takes effect before
    the next lookahead step, which tests it."""
    alpha = max(rate.used for rate in state.rates.groups)
    state.steps += 1
    if state.deferred is not None and state.steps % update_every == 0:
        set_adapted(state, param_groups, per_group, state.deferred.groups, state.deferred.alphas)
        state.deferred = None
    alpha_next = max(rate.used for rate in state.rates.groups)
    state.info = StepInfo(f0, math.nan, math.nan, math.nan, alpha, alpha_next, Decision.PLAIN)

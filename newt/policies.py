"""The policies around the rule: each a pure predicate, and a small object with its own state.

The predicates are pure functions of a few floats, property-tested in ``tests/test_policies.py``.
Each is scale-free: multiplying the loss by ``c > 0`` never changes its answer. The objects
below bind a predicate to its option (``newt.Policies``), say which state fields it owns (in
:class:`newt._state.State`) and read and write its fragment of ``state_dict()["newt"]``.
Which mode runs which policy is ``newt.modes.MODES``; the mathematics is in ``docs/math.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from newt import _checkpoint as checkpoint
from newt._numerics import Decision, Proposal, all_finite, clamp_alpha
from newt.options import RuleOptions

__all__ = [
    "LINEAR_TOLERANCE",
    "LOSS_ROUNDING_ULPS",
    "RISE_WINDOW",
    "blew_up",
    "grown_rate",
    "held_on_ascent",
    "is_spike",
    "nearly_linear",
    "next_batch_verdict",
    "rose_sharply",
    "sufficient_decrease",
]

LOSS_ROUNDING_ULPS = 64
"""The rounding error of a loss value, in units of its dtype's relative precision: a batch mean
sums hundreds of rounded terms, and no test compares a change smaller than this."""

LINEAR_TOLERANCE = 0.1
"""A descending step whose slope changed by less than this share of ``d0`` counts as nearly
linear: a quadratic through it has its minimum beyond ``10 * alpha``."""

RISE_WINDOW = 8
"""How many recent batch losses (one per closure step) a plain step's loss is compared with."""


# ---------------------------------------------------------------------- the predicates


def is_spike(f0: float, f1: float, threshold: float) -> bool:
    """Whether the lookahead loss ``f1`` rose above the starting loss ``f0`` by more than
    ``threshold * |f0|`` on the same batch: the step overshot the line far past its minimum.

    On a convex line ``f1 > f0`` only when the rate exceeds twice the minimiser. A value that
    is not finite is no spike (that is the non-finite guard's case); ``threshold`` may be
    ``math.inf`` (off).
    """
    return all_finite(f0, f1) and f1 - f0 > threshold * abs(f0)


def sufficient_decrease(f0: float, f1: float, d0: float, armijo: float, resolution: float = 0.0) -> bool | None:
    """Armijo's sufficient-decrease test of one step, on the batch it was measured on.

    ``d0 = <grad L(theta), d>`` is the decrease the slope predicts for the step ``d``. The test
    passes (True) when the loss fell by at least ``armijo`` times that, ``f0 - f1 >= armijo * d0``,
    and fails (False) when it fell by less or rose. It does not apply (None) to a step that is not
    a descent direction (``d0 <= 0``), to a value that is not finite, or when the decrease to
    achieve, ``armijo * d0``, is below ``resolution``, the rounding error of the loss values (a
    step too small to move the loss by more than rounding cannot be judged by it).

    On a quadratic line with minimiser ``a*`` the share achieved is ``1 - alpha / (2 a*)``, so
    the test passes exactly for ``alpha <= 2 (1 - armijo) a*``.
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
    the loss up).
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
    healthy run does not climb back above where it started. An infinite ``f`` blew up; a NaN
    ``f`` or a non-finite ``first`` says nothing (False); ``threshold`` may be ``math.inf`` (off).
    """
    if not math.isfinite(first) or math.isnan(f) or math.isinf(threshold):
        return False
    return f > first + threshold * abs(first)


def rose_sharply(recent: Sequence[float], f: float, threshold: float) -> bool:
    """Whether a batch's loss ``f`` rose above the largest of the recent batch losses ``recent``
    by more than ``threshold`` times its size (lazy mode, on a plain step).

    Lazy mode's plain steps run unmeasured at the rate the last lookahead step tested; an
    instability that builds up over a few of them shows as a batch loss well above every recent
    one. Batch losses scatter, so the comparison is with the largest recent loss and the
    threshold is wide. Non-finite entries of ``recent`` are skipped; without a finite one, or for
    a NaN ``f``, nothing is judged (False); an infinite ``f`` rose.
    """
    finite = [x for x in recent if math.isfinite(x)]
    return bool(finite) and blew_up(max(finite), f, threshold)


def held_on_ascent(alpha: float, d0: float, proposal: Proposal) -> Proposal:
    """The rate after a step whose direction went uphill on its own batch: not lowered.

    ``d0 = <grad L(theta), d> < 0`` means the inner optimizer's direction (its momentum, its
    preconditioner) rose along the batch it was measured on. Every rule then lowers the rate,
    but the verdict is about the direction, not the step's size, and such steps come in runs
    that collapsed the rate. Returns ``Proposal(alpha, "ascent")`` when ``d0 < 0`` and
    ``proposal`` would lower ``alpha``; otherwise ``proposal`` unchanged.
    """
    if d0 < 0.0 and proposal.alpha < alpha:
        return Proposal(alpha, Decision.ASCENT)
    return proposal


def grown_rate(alpha: float, options: RuleOptions, decision: Decision = Decision.VANISHED) -> Proposal:
    """The rate after a step too small to measure anything: ``alpha * options.max_factor``, clamped.

    ``"vanished"``: a step ``d = alpha * w`` rounded to exactly zero in every parameter while
    ``w`` is not zero (``alpha`` far below the parameters' relative precision), so ``D0 = D1 = 0``
    and the rules, which see a zero direction, would keep ``alpha`` forever. ``"linear"``: the
    step went down a nearly straight line, its curvature below the resolution of the
    measurements, and the rules would keep ``alpha`` for as long as that lasts.
    """
    if not (math.isfinite(alpha) and alpha > 0.0):
        return Proposal(options.alpha_min, Decision.NONFINITE)
    return Proposal(clamp_alpha(alpha * options.max_factor, options.alpha_min, options.alpha_max), decision)


def nearly_linear(d0: float, d1: float, f0: float | None, f1: float | None) -> bool:
    """The step went down a nearly straight line: far too short to measure any curvature.

    When the slope is positive and nearly unchanged along the step and the loss did not rise,
    the minimum lies far beyond. Without the losses (closure-free mode) nothing confirms the
    descent: there, after an overshoot, the slopes of two batches can agree while the loss
    climbs, so the rate is kept.
    """
    if f0 is None or f1 is None:
        return False
    return d0 > 0.0 and abs(d0 - d1) <= LINEAR_TOLERANCE * d0 and f1 <= f0


def loss_resolution(loss_eps: float, f0: float, f1: float) -> float:
    """The rounding error of two loss values of relative precision ``loss_eps``: a change below it
    is not measured."""
    return LOSS_ROUNDING_ULPS * loss_eps * max(abs(f0), abs(f1))


# ---------------------------------------------------------------------- the policy objects


@dataclass(frozen=True)
class SpikeTest:
    """A same-batch loss rise above ``threshold * |f0|`` shrinks the rate; undone if ``reject``."""

    threshold: float
    reject: bool

    def fires(self, f0: float, f1: float) -> bool:
        return is_spike(f0, f1, self.threshold)


@dataclass(frozen=True)
class StartTest:
    """The initial rate's probation: until one step passes Armijo's test, a step that fails is
    undone. State: ``start_proven``."""

    armijo: float
    fields = ("start_proven",)

    def on_probation(self, state: Any) -> bool:
        return self.armijo > 0.0 and not state.start_proven

    def state_dict(self, state: Any, *context: Any) -> dict[str, Any]:
        return {"start_proven": state.start_proven}

    def load_state_dict(self, state: Any, saved: Mapping[str, Any], *context: Any) -> None:
        # checkpoints from before the start-up test: a run that took steps is past its start
        state.start_proven = checkpoint.flag(saved.get("start_proven", state.steps > 0), "start_proven")


@dataclass(frozen=True)
class BlowUpCheck:
    """Closure-free mode given the loss, after the start: a batch loss above the first one read by
    more than ``threshold`` times its size is treated as a spike. State: ``loss_reference``."""

    threshold: float
    fields = ("loss_reference",)

    @property
    def active(self) -> bool:
        return math.isfinite(self.threshold)

    def fires(self, reference: float | None, f: float) -> bool:
        return reference is not None and blew_up(reference, f, self.threshold)

    def state_dict(self, state: Any, *context: Any) -> dict[str, Any]:
        return {"loss_reference": state.loss_reference}

    def load_state_dict(self, state: Any, saved: Mapping[str, Any], *context: Any) -> None:
        state.loss_reference = checkpoint.number(saved.get("loss_reference"), "loss_reference", optional=True)


@dataclass(frozen=True)
class RiseCheck:
    """Lazy mode: a plain step whose loss rose sharply above the recent ones is measured instead.
    State: ``recent_losses``, the last :data:`RISE_WINDOW` closure steps' losses."""

    threshold: float
    fields = ("recent_losses",)

    @property
    def active(self) -> bool:
        return math.isfinite(self.threshold)

    def rose(self, state: Any, f0: float) -> bool:
        return rose_sharply(state.recent_losses, f0, self.threshold)

    @staticmethod
    def remembered(recent: tuple[float, ...], f0: float) -> tuple[float, ...]:
        """``recent`` with a closure step's loss at ``theta_t`` added (non-finite ones are not)."""
        return (*recent, f0)[-RISE_WINDOW:] if math.isfinite(f0) else recent

    def state_dict(self, state: Any, *context: Any) -> dict[str, Any]:
        return {"recent_losses": list(state.recent_losses)}

    def load_state_dict(self, state: Any, saved: Mapping[str, Any], *context: Any) -> None:
        # absent from checkpoints made before the rise check: the window refills within RISE_WINDOW steps
        values = checkpoint.numbers_list(saved.get("recent_losses", []), "recent_losses")
        state.recent_losses = tuple(values)[-RISE_WINDOW:]


@dataclass(frozen=True)
class AscentHold:
    """Lookahead mode, built-in rules: keep the rate after an uphill step where the rule lowers it."""

    enabled: bool

    def applied(self, alpha: float, d0: float, proposal: Proposal) -> Proposal:
        return held_on_ascent(alpha, d0, proposal) if self.enabled else proposal


@dataclass(frozen=True)
class NonfiniteCheck:
    """NaN or infinite measurements shrink the rate; with ``reject`` the step is undone, and a
    non-finite loss or gradient at ``theta_t`` stops the step before the inner step."""

    reject: bool

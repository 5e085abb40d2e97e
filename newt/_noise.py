"""Mini-batch noise in the lookahead's slopes, and the correction that removes it.

The lookahead measures ``f1`` and ``d1`` on the *same* batch as the step it evaluates. The step
followed that batch's gradient, noise included, so along it the batch's loss falls further
than the expected loss does: every same-batch slope is too large by a noise term ``n``. Along
the line ``g_B(a) = g(a) - n a / alpha`` (the batch loss is the expected loss plus a term that
is linear along the step, to first order), the measured numbers are::

    f1_batch = f1 - n,    d0_batch = d0 + n,    d1_batch = d1 + n

and the rules, fed these, aim at the *batch's* line minimiser, which lies beyond the expected
loss's. On noisy tasks that made the rate settle about ten times above the best constant rate.

The next step evaluates the gradient at the same point ``theta_{t+1}`` on a fresh batch, which
is independent of the step: ``<grad L_fresh(theta_{t+1}), d_t>`` is an unbiased estimate of the
expected slope there, and ``n ~ d1_batch - d1_fresh``. ``NoiseEstimate`` keeps a moving average
of that excess relative to ``d0``; ``debiased`` subtracts it. The shift leaves every rule's
curvature estimate (``d0 - d1``, ``f0 - f1 - d1``, ``f1 - f0 + d0``) unchanged and moves only
their numerators, so on a deterministic problem (``n = 0``) nothing changes at all.

The estimate is capped: removing all of the noise makes the rate the one-step optimum of the
expected loss, which in the noise-dominated late phase of training decays toward zero (the
short-horizon bias of greedy rates; Wu, Ren, Liao and Grosse, ICLR 2018). Measured on the
benchmark tasks, a cap of one half of ``d0`` works best (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

from newt._numerics import all_finite

AVERAGING = 0.9
"""Moving-average coefficient of the noise estimate: it averages over about ten steps, since
one fresh-batch slope is itself as noisy as the bias it estimates."""


def debiased(f1: float, d0: float, d1: float, fraction: float) -> tuple[float, float, float]:
    """Remove the noise share ``fraction`` of ``d0`` from the same-batch measurements.

    Returns ``(f1 + s, d0 - s, d1 - s)`` with ``s = fraction * d0``: the measurements of the
    line whose slope is lower by ``s / alpha`` everywhere. ``f0`` needs no change.
    """
    shift = fraction * d0
    return f1 + shift, d0 - shift, d1 - shift


class NoiseEstimate:
    """Per rate unit, the share of the same-batch slope ``d0`` that is mini-batch noise.

    Args:
        cap: The largest share ever returned, in [0, 1]; 0 turns the correction off.
    """

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self._averages: dict[int, list[float]] = {}  # unit key -> [excess of d1, d0]

    def copy(self) -> NoiseEstimate:
        """An independent copy (a step updates a copy, which it keeps once the step completes)."""
        other = NoiseEstimate(self.cap)
        other._averages = {key: list(averages) for key, averages in self._averages.items()}
        return other

    def observe(self, key: int, d0: float, d1_same: float, d1_fresh: float) -> None:
        """Record one step's ``d0`` and ``d1`` (same batch) and ``d1`` on the next, fresh batch."""
        if not all_finite(d0, d1_same, d1_fresh):
            return  # a fault; the rules deal with it. It must not poison the averages.
        averages = self._averages.setdefault(key, [0.0, 0.0])
        averages[0] = AVERAGING * averages[0] + (1.0 - AVERAGING) * (d1_same - d1_fresh)
        averages[1] = AVERAGING * averages[1] + (1.0 - AVERAGING) * d0

    def fraction(self, key: int) -> float:
        """The noise share of ``d0`` for this unit, in ``[0, cap]`` (0 before any observation).

        A ratio of two moving averages started at zero needs no bias correction: both carry
        the same start-up factor, which cancels.
        """
        excess, scale = self._averages.get(key, (0.0, 0.0))
        if not scale > 0.0:  # no descent measured yet (or only ascent): nothing to correct
            return 0.0
        return min(max(excess / scale, 0.0), self.cap)

    def state_dict(self) -> list[list[float]]:
        return [[float(key), *averages] for key, averages in sorted(self._averages.items())]

    def load_state_dict(self, state: Any) -> None:
        self._averages = {int(key): [float(excess), float(scale)] for key, excess, scale in state}

"""What one step measured and decided: the records ``Newt.step_info`` holds, for logging."""

from __future__ import annotations

from dataclasses import dataclass

from newt._numerics import Decision

__all__ = ["GroupStepInfo", "StepInfo"]


@dataclass(frozen=True)
class GroupStepInfo:
    """What one step measured and decided for one param group (``per_group=True`` only).

    Attributes:
        index: The param group's index in ``param_groups``.
        d0: ``<grad L(theta_t), d_t>`` over the group's parameters.
        d1: ``<grad L(theta_{t+1}), d_t>`` over the group's parameters.
        alpha: The group's rate for the step.
        alpha_next: The group's rate for the next step.
        decision: Why the group's rule chose ``alpha_next``.
        noise: The share of ``d0`` removed from the slopes as mini-batch noise before the rule.
    """

    index: int
    d0: float
    d1: float
    alpha: float
    alpha_next: float
    decision: Decision
    noise: float = 0.0


@dataclass(frozen=True)
class StepInfo:
    """What one ``Newt.step`` measured and decided, for logging.

    Attributes:
        f0: Loss at the start of the step, ``L(theta_t)`` (NaN in closure-free mode).
        f1: Loss at the lookahead point ``theta_{t+1}``, same batch (NaN when not measured).
        d0: ``<grad L(theta_t), d_t>`` with the step ``d_t = theta_t - theta_{t+1}``. In
            closure-free mode, the sum over the block of steps that was just evaluated.
        d1: ``<grad L(theta_{t+1}), d_t>`` (closure-free mode: with the next batch's gradient).
            Where the lookahead computes no gradient (``gen``'s forward-only default,
            ``gen-three-point``, ``gen-exact``), ``d0 - C``: the slope there of the parabola the
            step measured, whose curvature along the step is ``C`` (``docs/math.md``).
        alpha: The rate the step used (the largest group's learning rate). In closure-free
            mode: the rate of the steps just measured (the previous step, or block).
        alpha_next: The rate the next step will use. In closure-free mode the rate is adapted
            at the start of ``step()``, so this step's own inner step already used it. With lazy
            updates a larger rate is held back for the plain steps (see ``update_every``).
        decision: Why the rule chose ``alpha_next`` (a :class:`newt.Decision`, a ``str``);
            ``"plain"`` when the step did not adapt the rate (lazy updates, closure-free blocks).
        rejected: True when the step was undone: the parameters are back at ``theta_t``. When
            the step was rejected before the inner step ran (a non-finite loss or gradient at
            ``theta_t``), ``f1``, ``d0`` and ``d1`` are NaN: they were never measured.
        groups: With ``per_group=True``, one :class:`GroupStepInfo` per adapted group; else None.
        noise: The share of ``d0`` that the rule saw removed from the slopes as mini-batch noise
            (see ``noise_correction``); ``f1``, ``d0`` and ``d1`` above are the raw measurements.
    """

    f0: float
    f1: float
    d0: float
    d1: float
    alpha: float
    alpha_next: float
    decision: Decision
    rejected: bool = False
    groups: tuple[GroupStepInfo, ...] | None = None
    noise: float = 0.0

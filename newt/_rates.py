"""Who owns ``group["lr"]``: the rate Newt adapts, and the multiplier a scheduler applies on top.

Note [rates and schedulers]: after every ``Newt.step`` each param group's ``"lr"`` holds the
rate the next step uses, ``multiplier * adapted`` (``docs/math.md``, "Who owns the learning
rate"). ``adapted`` is Newt's own rate; ``multiplier`` is 1 until something else (an
``lr_scheduler``, a user) changes ``group["lr"]`` between two steps. Newt reads such a change as
a multiplicative schedule factor, ``multiplier *= new / written``, which is exactly what
PyTorch's chainable schedulers do when ``scheduler.step()`` runs (LinearLR, CosineAnnealingLR,
ExponentialLR, StepLR, MultiStepLR, PolynomialLR, ConstantLR, MultiplicativeLR and SequentialLR
between its milestones): warm-up and decay multiply the rate Newt finds. A write of exactly
``group["initial_lr"]`` (the base rate torch schedulers record) is read as the multiplier
returning to 1: that is how closed-form updates say "factor 1", e.g. SequentialLR switching to
CosineAnnealingLR. Other absolute writes computed from the initial rate (LambdaLR, OneCycleLR,
CyclicLR, ``step(epoch)``) know nothing of Newt's rate; docs/schedulers.md says what happens
then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ParamGroups = Sequence[dict[str, Any]]


@dataclass
class GroupRate:
    """The rate bookkeeping of one param group.

    Attributes:
        adapted: Newt's rate for the group, before any scheduler multiplier.
        multiplier: The product of the external changes to ``group["lr"]`` (1 without any).
        written: The ``"lr"`` value Newt last wrote, to notice external changes.
    """

    adapted: float
    multiplier: float
    written: float

    @property
    def used(self) -> float:
        """The rate the group's next step uses."""
        return self.adapted * self.multiplier


class Rates:
    """Per-group adapted rates and scheduler multipliers, synchronised with ``param_groups``."""

    def __init__(self) -> None:
        self.groups: list[GroupRate] = []
        self.base_writes = 0  # consecutive syncs that read a write of initial_lr as a factor of 1

    def copy(self) -> Rates:
        """An independent copy: a step adapts a copy, which becomes the rates once the step completes."""
        other = Rates()
        other.groups = [GroupRate(r.adapted, r.multiplier, r.written) for r in self.groups]
        other.base_writes = self.base_writes
        return other

    def sync(self, param_groups: ParamGroups) -> bool:
        """Take in changes made to ``group["lr"]`` since the last write, and new groups.

        Returns whether ``initial_lr`` was written, and read as a factor of 1 where the adapted
        rate differs from it, for the second sync in a row: a schedule that keeps writing
        absolute rates (LambdaLR), whose value is not the rate applied. Once (SequentialLR
        switching to its next schedule) is how a chainable schedule restarts: not reported.
        """
        overwritten = False
        for index, group in enumerate(param_groups):
            lr = float(group["lr"])
            if index == len(self.groups):
                self.groups.append(GroupRate(adapted=lr, multiplier=1.0, written=lr))
            elif lr != self.groups[index].written:
                overwritten = self._read_change(group, self.groups[index], lr) or overwritten
        del self.groups[len(param_groups) :]
        self.base_writes = self.base_writes + 1 if overwritten else 0
        return self.base_writes == 2  # once per run of such writes

    def _read_change(self, group: dict[str, Any], rate: GroupRate, lr: float) -> bool:
        """Take in a change of one group's ``"lr"`` to ``lr``; True for a base rate read as factor 1
        while the adapted rate differs from it."""
        if "initial_lr" in group and lr == float(group["initial_lr"]) and rate.adapted > 0.0:
            # A scheduler wrote back its base rate: the closed-form way of saying "factor 1"
            # (SequentialLR switching to CosineAnnealingLR, LambdaLR at lambda 1, ...). The
            # rate used is then the adapted rate itself.
            rate.multiplier = 1.0
            self._write_one(group, rate)
            return rate.adapted != lr
        if rate.written > 0.0 and rate.adapted > 0.0:
            rate.multiplier *= lr / rate.written
        elif rate.adapted > 0.0 and float(group.get("initial_lr", 0.0)) > 0.0:
            # Back from zero (a cosine schedule restarting): no ratio exists, only the base.
            rate.multiplier = lr / float(group["initial_lr"])
        else:  # a frozen group (lr 0) given a rate: that is a new starting rate, not a factor
            rate.adapted, rate.multiplier = lr, 1.0
        rate.written = lr
        return False

    def write(self, param_groups: ParamGroups) -> None:
        """Set every group's ``"lr"`` to its ``multiplier * adapted`` (tensor rates in place)."""
        for group, rate in zip(param_groups, self.groups):
            self._write_one(group, rate)

    @staticmethod
    def _write_one(group: dict[str, Any], rate: GroupRate) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr.fill_(rate.used)
            rate.written = float(lr)  # what the tensor's dtype kept
        else:
            group["lr"] = rate.written = rate.used

    def scale_all(self, reference: int, adapted_next: float) -> None:
        """One global rate: scale every group like ``reference``, which gets ``adapted_next``.

        Groups whose adapted rate equals the reference's get ``adapted_next`` exactly, so the
        usual single-rate case involves no rounding.
        """
        old = self.groups[reference].adapted
        if adapted_next == old:  # nothing changes (also the only case where old may be 0)
            return
        factor = adapted_next / old
        for rate in self.groups:
            rate.adapted = adapted_next if rate.adapted == old else rate.adapted * factor

    def state_dict(self) -> list[list[float]]:
        return [[r.adapted, r.multiplier, r.written] for r in self.groups]

    def load_state_dict(self, state: Sequence[Sequence[float]]) -> None:
        self.groups = [GroupRate(float(a), float(m), float(w)) for a, m, w in state]


def learning_rates(param_groups: Sequence[dict[str, Any]]) -> list[float]:
    """Every group's ``"lr"`` as a float (to put back after a step that failed)."""
    return [float(group["lr"]) for group in param_groups]


def restore_learning_rates(param_groups: Sequence[dict[str, Any]], rates: Sequence[float]) -> None:
    """Put back the rates a failed step found (tensor rates in place)."""
    for group, rate in zip(param_groups, rates):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate

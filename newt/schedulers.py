"""A factor schedule that multiplies ``Newt``'s adapted rate: the chainable form of ``LambdaLR``."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ABSOLUTE_SCHEDULE", "FactorLR", "ScheduleWarning"]


class ScheduleWarning(UserWarning):
    """A scheduler wrote an absolute rate that is not the rate ``Newt`` applies."""


ABSOLUTE_SCHEDULE = (
    "a param group's 'lr' was set to its 'initial_lr' between two steps, as a closed-form schedule "
    "does (LambdaLR, OneCycleLR, a plain Hugging Face Trainer's schedule): Newt reads that as a factor "
    "of 1 and applies its own adapted rate, so the value the schedule wrote (and its get_last_lr()) is "
    "not the rate applied. Log opt.step_info.alpha (the rate each step used) or read param_groups "
    "after opt.step(), and use a chainable scheduler or newt.FactorLR, whose factors multiply Newt's "
    "rate (newt.integrations.huggingface.NewtTrainer does this for the Trainer); see docs/schedulers.md."
)


class FactorLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose factor ``lr_lambda(step)`` multiplies the rate the optimizer holds.

    ``LambdaLR`` writes the absolute rate ``initial_lr * lr_lambda(step)``, which overwrites the
    rate ``Newt`` adapted (docs/schedulers.md). ``FactorLR`` takes the same functions and writes
    each step's factor as a ratio to the last one, ``lr * lr_lambda(step) / lr_lambda(step - 1)``,
    which ``Newt`` reads as its multiplier: the rate used at step t is ``lr_lambda(t)`` times the
    adapted rate. Around a plain optimizer the rates are ``LambdaLR``'s, up to rounding. After a
    factor of 0 (the first step of a warm-up from zero, or a cyclic schedule's trough) there is
    no ratio, and it writes ``initial_lr * lr_lambda(step)``, which ``Newt`` reads as the factor
    itself (a return from zero keeps the adapted rate).

    Args:
        optimizer: The optimizer, usually a :class:`newt.Newt`.
        lr_lambda: The factor as a function of the step, or one function per param group,
            as for ``LambdaLR`` (e.g. the ``lr_lambdas`` of a scheduler from Hugging Face's
            ``get_scheduler``).
        last_epoch: As for ``LambdaLR``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, lr_lambda, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        """Each group's rate times the ratio of this step's factor to the one it was written for."""
        step = self.last_epoch
        # The step whose factor the rates in the groups carry: the last one written here, or (at
        # construction) none on a fresh start and the step before on ``last_epoch`` >= 0.
        # ``scheduler.step(epoch)`` may jump; the ratio is taken to the factor actually applied.
        written_for = getattr(self, "_written_for", step - 1)
        self._written_for = step
        rates: list[float | torch.Tensor] = []
        for group, factor_of, base in zip(self.optimizer.param_groups, self.lr_lambdas, self.base_lrs, strict=True):
            now = float(factor_of(step))
            before = float(factor_of(written_for)) if written_for >= 0 else 1.0
            rates.append(group["lr"] * (now / before) if before != 0.0 else base * now)
        return rates

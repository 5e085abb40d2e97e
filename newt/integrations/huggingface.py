"""The Hugging Face ``Trainer`` made to work with ``Newt``: the loss and the schedule.

The plain ``Trainer`` takes a ``Newt`` (docs/integrations/huggingface.md), with two gaps that
:class:`NewtTrainer` (or :class:`NewtTrainerMixin` in front of another ``Trainer`` subclass)
closes:

- The Trainer runs its own forward and ``backward()`` and calls ``optimizer.step()`` bare, so
  ``Newt`` works in closure-free mode and, without the loss, cannot test the initial rate: from
  a far-too-large start the first steps can wreck the model. ``NewtTrainer`` hands each
  optimizer step's loss to :meth:`newt.Newt.give_loss`, which is what ``opt.step(loss=loss)``
  does in a hand-written loop.
- Without a scheduler of yours, the Trainer builds a ``LambdaLR`` from ``lr_scheduler_type``,
  whose absolute rates overwrite ``Newt``'s. ``NewtTrainer`` turns it into a
  :class:`newt.schedulers.FactorLR` with the same factors, which multiply ``Newt``'s rate.

Usage, like ``Trainer``: the optimizer ``TrainingArguments`` describe (``optim``,
``learning_rate`` as the initial rate, ``weight_decay``) is built and wrapped in a ``Newt``::

    from newt.integrations.huggingface import NewtTrainer

    trainer = NewtTrainer(model=model, args=args, train_dataset=data)

or with a ``Newt`` of your own: ``optimizers=(Newt(inner, ...), None)``; ``newt_options=``
passes options to the ``Newt`` the Trainer builds (``{"strategy": "retsinas"}``).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import transformers
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "newt.integrations.huggingface needs transformers and accelerate: "
        "pip install 'newt-lr[huggingface]'"
    ) from missing

from newt.optimizer import Newt
from newt.schedulers import FactorLR

__all__ = ["NewtTrainer", "NewtTrainerMixin", "unwrap_newt"]


class NewtTrainerMixin:
    """Give ``Newt`` each step's loss and a schedule it composes with; put it first in the bases.

    ``class MyTrainer(NewtTrainerMixin, SomeTrainer)`` works with any subclass of
    ``transformers.Trainer`` that keeps its ``training_step`` and ``create_scheduler``.

    The loss: each micro-batch's loss, as ``training_step`` returns it (scaled for gradient
    accumulation, so the window's sum is the loss whose gradient the optimizer step uses), is
    added up on the device, and on the micro-batch that ends the window (Accelerate's
    ``sync_gradients``) the sum goes to :meth:`newt.Newt.give_loss`. Nothing is read on the
    host here; ``Newt`` reads the loss for its start-up test and its blow-up check.

    The schedule: see :meth:`create_scheduler`.
    """

    _newt_window_loss: torch.Tensor | None = None

    def __init__(self, *args: Any, newt_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """The Trainer's arguments, plus ``newt_options`` for the ``Newt`` it builds.

        Raises:
            TypeError: ``optimizers=`` holds an optimizer with no ``Newt`` inside, or both a
                ``Newt`` and ``newt_options`` (give the options to your ``Newt``).
        """
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.newt_options = dict(newt_options or {})
        if self.optimizer is not None:  # type: ignore[has-type]
            unwrap_newt(self.optimizer)  # type: ignore[has-type]
            if self.newt_options:
                raise TypeError(
                    "newt_options configure the Newt the Trainer builds, but optimizers= already "
                    "holds one: give the options to that Newt instead."
                )

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer the Trainer builds from its arguments, wrapped in a ``Newt``.

        ``learning_rate`` becomes the initial rate, which ``Newt`` adapts; ``optim`` and
        ``weight_decay`` choose and configure the inner optimizer as they do for ``Trainer``.
        An optimizer passed in ``optimizers=`` is kept as it is.
        """
        if self.optimizer is None:  # type: ignore[has-type]
            inner = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
            self.optimizer = Newt(inner, **self.newt_options)
        return self.optimizer

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's ``training_step``, then the loss added to the window's sum."""
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        window = loss if self._newt_window_loss is None else self._newt_window_loss + loss
        if self.accelerator.sync_gradients:  # type: ignore[attr-defined]
            # The Trainer clips the gradients and calls optimizer.step() after this micro-batch.
            unwrap_newt(self.optimizer).give_loss(window)  # type: ignore[attr-defined]
            window = None
        self._newt_window_loss = window
        return loss

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The Trainer's scheduler; a ``LambdaLR`` it built becomes a ``FactorLR`` with its factors.

        A scheduler passed in ``optimizers=`` is kept as it is, and so are the built types that
        are not ``LambdaLR`` (``"reduce_lr_on_plateau"``, ``"greedy"``).
        """
        passed = self.lr_scheduler is not None  # type: ignore[attr-defined]
        scheduler = super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
        if passed or type(scheduler) is not torch.optim.lr_scheduler.LambdaLR:
            return scheduler
        for group in scheduler.optimizer.param_groups:
            group["lr"] = group["initial_lr"]  # take back LambdaLR's first write
        self.lr_scheduler = FactorLR(scheduler.optimizer, scheduler.lr_lambdas)
        return self.lr_scheduler


class NewtTrainer(NewtTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` for a ``Newt`` optimizer: see :class:`NewtTrainerMixin`.

    Without ``optimizers=``, the Trainer's own optimizer (from ``optim``, ``learning_rate`` and
    ``weight_decay``) is wrapped in a ``Newt`` with ``newt_options``. ``lr_scheduler_type`` (and
    the warm-up arguments) becomes a factor on ``Newt``'s rate, unless ``optimizers=`` also
    holds a scheduler of yours, which is kept as it is (use a chainable one).
    """


def unwrap_newt(optimizer: object) -> Newt:
    """The ``Newt`` inside the Trainer's optimizer (Accelerate wraps it in ``.optimizer``).

    Raises:
        TypeError: There is no ``Newt`` inside.
    """
    found = optimizer
    while not isinstance(found, Newt):
        inner = getattr(found, "optimizer", None)
        if inner is None or inner is found:
            raise TypeError(
                f"NewtTrainer gives the loss to a Newt optimizer, but the Trainer's optimizer is "
                f"{type(optimizer).__name__} with no Newt inside: leave optimizers= out (the Trainer's "
                "own optimizer is wrapped) or pass optimizers=(Newt(inner_optimizer), scheduler)."
            )
        found = inner
    return found

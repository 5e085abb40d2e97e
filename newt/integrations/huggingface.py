"""The Hugging Face ``Trainer`` giving ``Newt`` the loss of each optimizer step.

The Trainer runs its own forward and ``backward()`` and calls ``optimizer.step()`` bare, so
``Newt`` works in closure-free mode, and without the loss it cannot test the initial rate: from
a far-too-large start the first steps can wreck the model (docs/integrations/huggingface.md).
:class:`NewtTrainer` (or :class:`NewtLossMixin` in front of another ``Trainer`` subclass) hands
the loss to the optimizer through :meth:`newt.Newt.give_loss` before each optimizer step, which
is what ``opt.step(loss=loss)`` does in a hand-written loop.

Usage::

    from newt.integrations.huggingface import NewtTrainer

    opt = Newt(torch.optim.AdamW(model.parameters(), lr=1e-3))
    scheduler = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    trainer = NewtTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, scheduler))
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from newt.optimizer import Newt

__all__ = ["NewtLossMixin", "NewtTrainer", "unwrap_newt"]


class NewtLossMixin:
    """Give ``Newt`` the loss of each optimizer step; put it first among a ``Trainer``'s bases.

    ``class MyTrainer(NewtLossMixin, SomeTrainer)`` works with any subclass of
    ``transformers.Trainer`` that keeps its ``training_step``. Each micro-batch's loss, as
    ``training_step`` returns it (scaled for gradient accumulation, so the window's sum is the
    loss whose gradient the optimizer step uses), is added up on the device, and on the
    micro-batch that ends the window (Accelerate's ``sync_gradients``) the sum goes to
    :meth:`newt.Newt.give_loss`. Nothing is read on the host here; ``Newt`` reads the loss only
    while the initial rate is on probation.
    """

    _newt_window_loss: torch.Tensor | None = None

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


class NewtTrainer(NewtLossMixin, transformers.Trainer):
    """``transformers.Trainer`` that gives its ``Newt`` optimizer the loss of every step.

    Pass the optimizer and a chainable scheduler, ``optimizers=(Newt(...), scheduler)``, as
    with the plain ``Trainer`` (docs/integrations/huggingface.md explains why the scheduler).
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
                f"NewtLossMixin gives the loss to a Newt optimizer, but the Trainer's optimizer is "
                f"{type(optimizer).__name__} with no Newt inside: pass "
                "optimizers=(Newt(inner_optimizer), scheduler) to the Trainer."
            )
        found = inner
    return found

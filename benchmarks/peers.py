"""The peers of the robustness sweep, from PyPI, each used the way its README asks.

Every method of the sweep (plain inner optimizers and ``Newt`` in ``benchmarks/robustness.py``,
the peers here) is driven through the same small interface, :class:`Stepper`: the training
loop hands it a function that computes the loss on the current mini-batch, and the stepper
does whatever its method does with it (one backward, a closure called twice, a parabola fit on
the next batch). What each peer does, and why:

- **Prodigy** (``prodigyopt.Prodigy``, ``lr=1.0``, no scheduler: the README's defaults).
- **D-Adaptation** (``dadaptation.DAdaptAdam``, ``lr=1.0``).
- **Schedule-Free AdamW** (``schedulefree.AdamWScheduleFree``): it has a learning rate, so it
  runs at every initial rate like the plain optimizers; ``warmup_steps`` is 5% of the run, as
  its README recommends warm-up; ``optimizer.train()`` before training and
  ``optimizer.eval()`` before evaluating (the evaluation point x differs from the gradient
  point y).
- **DoG** (``dog.DoG``, ``lr=1.0``) with the package's ``PolynomialDecayAverager``, stepped
  after every optimizer step; the *averaged* model is evaluated, as the README insists.
- **GeN, the official code** (``gen-optim``, ``GeN.lr_parabola``) wrapping Adam or SGD at each
  initial rate, called every 4th step (the README: "lazy_freq>=4 for efficiency") between
  ``backward()`` and ``optimizer.step()``, with ``task="image_cls"``, a training iterator that
  yields ``(inputs, targets)`` and our loss as the criterion. Each call costs three no-grad
  forward passes on a fresh batch. Two things the official code does that are worth knowing:
  it calls ``optimizer.step()`` itself, moves the parameters back to ``theta_t``, and the
  README's own ``optimizer.step()`` follows, so the inner optimizer's state (moments, step
  count) advances twice on the lazy steps; and it ``print``s the exception when the fit fails
  (that output is captured here and counted as ``fit_failures``).

Gradient evaluations are counted by :class:`PassCounter`, independently of the methods: a hook
on the model counts forward passes and a hook on each loss counts backward passes.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.tasks import loss_fn

BatchLoss = Callable[[], torch.Tensor]
"""Computes the loss of the current mini-batch with autograd on (a forward pass, no backward)."""

# A forward pass without backward costs about a third of a forward + backward (the backward of
# a dense layer is two matrix products, the forward one): GeN's parabola points are charged so.
FORWARD_ONLY_COST = 1.0 / 3.0


class PassCounter:
    """Counts the passes a training run makes, whatever the method does internally.

    Forward passes: a forward pre-hook on the model (GeN's no-grad parabola points included).
    Backward passes: :meth:`watch` puts a hook on each loss tensor, which fires once per
    ``backward()`` through it. ``cost`` is in gradient evaluations: one per backward (with its
    forward), :data:`FORWARD_ONLY_COST` per forward pass that had no backward.
    """

    def __init__(self, model: nn.Module) -> None:
        self.forwards = 0
        self.backwards = 0
        self._handle = model.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        self.forwards += 1

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        """Count the backward passes through ``loss``; returns it unchanged."""
        if loss.requires_grad:
            loss.register_hook(self._on_backward)
        return loss

    @property
    def cost(self) -> float:
        return self.backwards + FORWARD_ONLY_COST * max(0, self.forwards - self.backwards)

    def close(self) -> None:
        """Stop counting (before the final evaluation, which is not part of the budget)."""
        self._handle.remove()


class Stepper:
    """One method's training step; the sweep's loop and evaluation are the same for all methods.

    The default is the usual loop: ``zero_grad()``, forward, ``backward()``, ``step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, batch_loss: BatchLoss) -> float:
        """Take one step on the current batch; returns the mini-batch loss at the start."""
        self.optimizer.zero_grad()
        loss = batch_loss()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def rate(self) -> float:
        """The step size the next step will use (for the rate plots)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        """Called once before training."""

    def eval(self) -> None:
        """Called once before the final evaluation."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate (DoG: the averaged one)."""
        return model

    def summary(self) -> dict[str, Any]:
        """Method-specific counts for the results file."""
        return {}


class ProdigyStepper(Stepper):
    """Prodigy with ``lr=1.0``; the rate shown is ``d * lr`` (Adam's step size)."""

    def __init__(self, params: Any) -> None:
        from prodigyopt import Prodigy

        super().__init__(Prodigy(params, lr=1.0))

    def rate(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["d"] * group["lr"])


class DAdaptAdamStepper(Stepper):
    """D-Adaptation Adam with ``lr=1.0``; the rate shown is ``d * lr``."""

    def __init__(self, params: Any) -> None:
        from dadaptation import DAdaptAdam

        super().__init__(DAdaptAdam(params, lr=1.0))

    def rate(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["d"] * group["lr"])


class ScheduleFreeStepper(Stepper):
    """Schedule-Free AdamW at ``lr``, with a warm-up over ``warmup_steps``."""

    def __init__(self, params: Any, lr: float, warmup_steps: int) -> None:
        from schedulefree import AdamWScheduleFree

        super().__init__(AdamWScheduleFree(params, lr=lr, warmup_steps=warmup_steps))

    def rate(self) -> float:
        return float(self.optimizer.param_groups[0]["scheduled_lr"])

    def train(self) -> None:
        self.optimizer.train()

    def eval(self) -> None:
        self.optimizer.eval()


class DoGStepper(Stepper):
    """DoG with ``lr=1.0`` and polynomial-decay iterate averaging; evaluates the average."""

    def __init__(self, model: nn.Module) -> None:
        from dog import DoG, PolynomialDecayAverager

        super().__init__(DoG(model.parameters(), lr=1.0))
        self.averager = PolynomialDecayAverager(model)

    def step(self, batch_loss: BatchLoss) -> float:
        loss = super().step(batch_loss)
        self.averager.step()
        return loss

    def rate(self) -> float:
        eta = self.optimizer.param_groups[0].get("eta")
        return float(eta[0]) if eta else math.nan  # DoG sets eta at its first step

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.averager.averaged_model


class GeNOfficialStepper(Stepper):
    """The official GeN code: ``lr_parabola`` every ``lazy_freq`` steps around ``inner``.

    ``batches`` yields ``(inputs, targets)`` for the parabola's points (its ``tr_iter``).
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        model: nn.Module,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        lazy_freq: int = 4,
    ) -> None:
        super().__init__(inner)
        self.model = model
        self.batches = batches
        self.lazy_freq = lazy_freq
        self.steps = 0
        self.calls = 0
        self.fit_failures = 0

    def step(self, batch_loss: BatchLoss) -> float:
        from GeN import lr_parabola

        self.optimizer.zero_grad()
        loss = batch_loss()
        loss.backward()
        if (self.steps + 1) % self.lazy_freq == 0:
            printed = io.StringIO()
            # The official code prints the exception of a failed fit (and halves the rate);
            # scipy warns when the fit's covariance is degenerate. Neither must reach the
            # progress bar; the failures are counted instead.
            with contextlib.redirect_stdout(printed), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lr_parabola(
                    self.model, self.optimizer, criterion=loss_fn, tr_iter=self.batches, device="cpu", task="image_cls"
                )
            self.calls += 1
            self.fit_failures += int(bool(printed.getvalue().strip()))
        self.optimizer.step()
        self.steps += 1
        return float(loss.detach())

    def summary(self) -> dict[str, Any]:
        return {"parabola_calls": self.calls, "fit_failures": self.fit_failures}

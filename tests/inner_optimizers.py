"""A registry of inner optimizers (and interesting options) that ``Newt`` should be able to wrap.

Each :class:`InnerOptimizer` entry builds a fresh optimizer over some parameters at a given
learning rate, so one test body can be run against every optimizer. ``too_large`` is a rate at
which the *plain* optimizer clearly does badly on the digits MLP of ``tests/models.py`` (it
diverges, saturates or stalls): it is the "far too large" starting point of the adaptation tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from lion_pytorch import Lion

__all__ = ["INNER_OPTIMIZERS", "InnerOptimizer", "by_id"]

Params = Iterable[torch.nn.Parameter] | Iterable[dict]


@dataclass(frozen=True)
class InnerOptimizer:
    """One inner optimizer with fixed options.

    Attributes:
        id: Short name, used as the pytest id.
        make: ``make(params, lr)`` builds the optimizer at learning rate ``lr``.
        too_large: A learning rate far too large for this optimizer on the digits MLP.
        notes: What makes the entry interesting (how its step depends on ``lr``).
    """

    id: str
    make: Callable[[Params, float], torch.optim.Optimizer]
    too_large: float
    notes: str = ""

    def __repr__(self) -> str:  # short, so failing-test output stays readable
        return f"InnerOptimizer({self.id!r})"


INNER_OPTIMIZERS: list[InnerOptimizer] = [
    InnerOptimizer(
        id="sgd",
        make=lambda params, lr: torch.optim.SGD(params, lr=lr),
        too_large=10.0,
        notes="Plain gradient descent: the step is lr * grad.",
    ),
    InnerOptimizer(
        id="sgd-momentum",
        make=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        too_large=10.0,
        notes="Heavy-ball momentum 0.9: the step depends on past gradients (effective rate ~10 lr).",
    ),
    InnerOptimizer(
        id="sgd-nesterov",
        make=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
        too_large=10.0,
        notes="Nesterov momentum 0.9.",
    ),
    InnerOptimizer(
        id="sgd-weight-decay",
        make=lambda params, lr: torch.optim.SGD(params, lr=lr, weight_decay=1e-3),
        too_large=10.0,
        notes="Coupled L2 weight decay 1e-3: the observed step includes lr * wd * theta.",
    ),
    InnerOptimizer(
        id="adam",
        make=lambda params, lr: torch.optim.Adam(params, lr=lr),
        too_large=10.0,
        notes="Adam: per-coordinate normalised step, roughly lr per coordinate.",
    ),
    InnerOptimizer(
        id="adamw",
        make=lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=1e-2),
        too_large=10.0,
        notes="AdamW with decoupled weight decay 1e-2 (the decay is scaled by lr too).",
    ),
    InnerOptimizer(
        id="nadam",
        make=lambda params, lr: torch.optim.NAdam(params, lr=lr),
        too_large=1.0,
        notes="Adam with Nesterov momentum (momentum decay schedule in the state).",
    ),
    InnerOptimizer(
        id="radam",
        make=lambda params, lr: torch.optim.RAdam(params, lr=lr),
        too_large=10.0,
        notes="Rectified Adam: un-normalised SGD-with-momentum steps for the first few steps.",
    ),
    InnerOptimizer(
        id="adamax",
        make=lambda params, lr: torch.optim.Adamax(params, lr=lr),
        too_large=10.0,
        notes="Adam with an infinity-norm second moment.",
    ),
    InnerOptimizer(
        id="adagrad",
        make=lambda params, lr: torch.optim.Adagrad(params, lr=lr),
        too_large=10.0,
        notes="Adagrad: accumulated squared gradients make its own effective rate decay over time.",
    ),
    InnerOptimizer(
        id="rmsprop",
        make=lambda params, lr: torch.optim.RMSprop(params, lr=lr),
        too_large=1.0,
        notes="RMSprop (alpha 0.99, no momentum): normalised by a running RMS of the gradient.",
    ),
    InnerOptimizer(
        id="lion",
        make=lambda params, lr: Lion(params, lr=lr),
        too_large=1.0,
        notes="lion-pytorch's Lion (third party): sign update, every coordinate moves by exactly lr.",
    ),
]


def by_id(entry_id: str) -> InnerOptimizer:
    """The registry entry called ``entry_id``."""
    for entry in INNER_OPTIMIZERS:
        if entry.id == entry_id:
            return entry
    raise KeyError(f"no inner optimizer {entry_id!r}; known: {[e.id for e in INNER_OPTIMIZERS]}")

"""The first stage of a step: the loss and the parameters that take part, gathered once."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from newt._rates import Rates
from newt.distributed import local_tensor

__all__ = ["Gathered", "as_float64", "checked_loss", "first_call", "gather", "loss_eps", "loss_tensor"]


@dataclass(slots=True)
class Gathered:
    """The parameters a step moves and the rate units it adapts.

    Attributes:
        active: The parameters that have a gradient, in param-group order.
        local: Their rank-local shards (the parameters themselves without DTensors).
        units: Positions in ``active`` per rate unit: one unit holding every parameter, or one
            per param group with ``per_group=True``.
        unit_groups: The group each unit adapts (with one global rate: the reference group,
            the one with the largest rate).
        sharded: Whether some parameter is a DTensor (``local`` then holds its shards).
    """

    active: list[torch.Tensor]
    local: list[torch.Tensor]
    units: list[list[int]]
    unit_groups: list[int]
    sharded: bool = False

    def grads(self) -> list[torch.Tensor | None]:
        """The active parameters' gradients now (rank-local shards)."""
        if self.sharded:
            return [local_tensor(p.grad) for p in self.active]
        return [p.grad for p in self.active]

    def split(self, items: Sequence[Any]) -> list[list[Any]]:
        """``items`` (one per active parameter) grouped by rate unit."""
        return [[items[i] for i in unit] for unit in self.units]


def gather(
    param_groups: Sequence[dict[str, Any]], rates: Rates, per_group: bool, missing: str, dtensors: bool = False
) -> Gathered:
    """The active parameters and the rate units; ``missing`` is the error when nothing has a gradient.

    ``dtensors``: whether some parameter may be a DTensor (else the rank-local shards are the
    parameters themselves, and looking for shards is skipped).

    Raises:
        RuntimeError: No parameter has a gradient, or a gradient is sparse.
    """
    active = [p for group in param_groups for p in group["params"] if p.grad is not None]
    if not active:
        raise RuntimeError(missing)
    if any(p.grad.is_sparse for p in active):
        raise RuntimeError(
            "Newt does not support sparse gradients (e.g. nn.Embedding(sparse=True)): use dense "
            "gradients (sparse=False)."
        )
    local = [local_tensor(p) for p in active] if dtensors else active
    groups = rates.groups
    if not per_group:
        # the group with the largest rate; with every rate used at 0 (a schedule at 0), the
        # largest adapted one, so that the step keeps the rates it cannot measure
        reference = max(range(len(groups)), key=lambda g: (groups[g].used, groups[g].adapted))
        return Gathered(active, local, [list(range(len(active)))], [reference], dtensors)
    units = _units_per_group(param_groups, active, rates)
    order = sorted(units)
    return Gathered(active, local, [units[g] for g in order], order, dtensors)


def _units_per_group(
    param_groups: Sequence[dict[str, Any]], active: list[torch.Tensor], rates: Rates
) -> dict[int, list[int]]:
    """Group index -> positions in ``active``, for every group that has gradients and a nonzero rate
    (every group that has gradients, when none has a nonzero rate)."""
    group_of = {id(p): g for g, group in enumerate(param_groups) for p in group["params"]}
    units: dict[int, list[int]] = {}
    for position, p in enumerate(active):
        g = group_of[id(p)]
        if rates.groups[g].used > 0.0:
            units.setdefault(g, []).append(position)
    if not units:  # a schedule at 0 everywhere: a plain step, whose rates stay as they are
        for position, p in enumerate(active):
            units.setdefault(group_of[id(p)], []).append(position)
    return units


def first_call(closure: Callable[[], Any]) -> tuple[Any, torch.Tensor]:
    """Call the closure at ``theta_t``: its return value and the loss as a float64 tensor."""
    loss = closure()
    return loss, loss_tensor(loss, "first")


def loss_eps(loss: object) -> float:
    """The relative rounding unit of a closure's loss: its dtype's, float32's for a Python number
    (most often the ``.item()`` of a float32 loss)."""
    if isinstance(loss, torch.Tensor) and loss.is_floating_point():
        return torch.finfo(loss.dtype).eps
    return torch.finfo(torch.float32).eps


def loss_tensor(loss: object, which: str) -> torch.Tensor:
    """The closure's loss as a detached float64 scalar tensor (no host sync).

    ``which`` names the closure call ("first", "second (lookahead)"), or is ``"loss="`` for the
    value given to a closure-free ``step``.
    """
    return as_float64(checked_loss(loss, which))


def as_float64(loss: torch.Tensor | numbers.Real) -> torch.Tensor:
    """A checked loss (see :func:`checked_loss`) as a detached float64 scalar tensor (no host sync)."""
    if isinstance(loss, torch.Tensor):
        # a copy even of a float64 loss: a closure may overwrite its loss buffer on the next call
        return loss.detach().reshape(()).to(torch.float64, copy=True)
    return torch.tensor(float(loss), dtype=torch.float64)


def checked_loss(loss: object, which: str) -> torch.Tensor | numbers.Real:
    """``loss`` itself if it is a scalar tensor or a real number; otherwise a ``TypeError``."""
    given = {"loss=": "step(loss=...)", "give_loss()": "give_loss()"}.get(which)
    source = f"{given} got" if given else f"the {which} closure call returned"
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(
                f"{source} a tensor of shape {tuple(loss.shape)}; it must "
                "be the scalar loss (reduce it, e.g. with .mean())."
            )
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return loss
    hint = "pass the batch's loss tensor" if given else "did you forget 'return loss'?"
    raise TypeError(f"{source} {type(loss).__name__}; it must be the loss as a scalar tensor or a number ({hint}).")

"""Making every rank agree: the reductions ``Newt`` needs under ``torch.distributed``.

Every rank must apply the same rate at every step, or ranks that disagree silently train
different models. The rule is a pure function of a handful of scalars, so it is enough that
every rank feeds it the same scalars:

- the losses ``f0`` and ``f1`` differ per rank (each sees its own shard of the batch): they are
  averaged, the loss of the whole batch when the shards are equal;
- the dot products ``d0`` and ``d1`` are sums over the parameters. With replicated parameters
  (DDP) the gradients are already averaged across ranks and every rank holds the same numbers;
  they are averaged too, which keeps them as they are. With sharded parameters (FSDP2's
  DTensor parameters) each rank holds a partial sum over its shard: they are summed.

All the scalars of a step travel in one ``all_reduce`` of a small float64 tensor, and only when
a process group is initialised: single-process users pay nothing. The decisions taken before
the inner step (``reject_nonfinite``, a GradScaler's overflow check) and the rare check for a
step that vanished need a flag agreed across ranks; each is one more tiny ``all_reduce``, only
on the paths that use it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["agree_all", "agree_any", "is_distributed", "is_dtensor", "local_tensor", "reduce_measurements", "sharded"]

# DTensor's public home from torch 2.5 on, and torch 2.4's, whose FSDP2 parameters are these
# DTensors too (without them its shards would pass for replicas).
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def _dtensor_classes() -> tuple[type, type] | None:
    """``(DTensor, Shard)`` once some code has imported DTensor's module, else None.

    A DTensor exists only after its module was imported, so until then no tensor is one. Looking
    the module up instead of importing it keeps ``import newt`` from importing
    ``torch.distributed.tensor`` (and sympy with it) for the users who never shard.
    """
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module.DTensor, module.Shard
    return None


def is_dtensor(tensor: torch.Tensor | None) -> bool:
    """True when ``tensor`` is a DTensor (an FSDP2 parameter, replicated or sharded)."""
    classes = _dtensor_classes()
    return classes is not None and isinstance(tensor, classes[0])


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def local_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The rank-local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    if is_dtensor(tensor):
        return tensor.to_local()
    return tensor


def sharded(params: Sequence[torch.Tensor]) -> bool:
    """True when some parameter is a DTensor sharded across ranks (FSDP2)."""
    classes = _dtensor_classes()
    if classes is None:
        return False
    dtensor, shard = classes
    return any(isinstance(p, dtensor) and any(isinstance(s, shard) for s in p.placements) for p in params)


def reduce_measurements(
    values: torch.Tensor, n_losses: int, *, is_sharded: bool, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Average the first ``n_losses`` entries (losses) across ranks; sum or average the rest.

    ``values`` is a 1-D float64 tensor: the step's losses, then its dot products. The rest are
    summed when ``is_sharded`` (each rank holds a partial sum), averaged otherwise (every rank
    holds the same numbers). Without a multi-rank process group, ``values`` is returned as is.
    """
    if not is_distributed(group):
        return values
    world = dist.get_world_size(group)
    reduced = values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    scale = torch.full_like(reduced, 1.0 / world)
    if is_sharded:
        scale[n_losses:] = 1.0
    return reduced * scale


def agree_all(flag: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``flag`` (a boolean scalar tensor) AND-ed across ranks."""
    if not is_distributed(group):
        return flag
    value = flag.to(torch.float32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return value[0] > 0


def agree_any(flag: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """``flag`` OR-ed across ranks."""
    if not is_distributed(group):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value[0] > 0)

"""Tensor work of a step: the snapshot buffer and the dot products along the step.

Note [one buffer]: the only parameter-sized memory Newt keeps is a snapshot of theta_t. The
step ``d = theta_t - theta_{t+1}`` is never stored: the dot products recompute it bucket by
bucket into short-lived temporaries (two at a time: the step's entries times the gradient, then
the same flattened into one tensor for a single sum) of at most ``_BUCKET_NUMEL`` elements each
(or one tensor, if a single tensor is larger). Keeping theta_t itself, rather than d, is what
lets a rejected or failed step restore the parameters bit for bit (``theta_{t+1} + d`` is not
always exactly ``theta_t`` in floating point).

Every function here has a multi-tensor path built on ``torch._foreach_*`` kernels and a
per-tensor path; the tests check that both give the same numbers. Results stay on the device:
the optimizer syncs once per step, for all its scalars together.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

Tensors = Sequence[torch.Tensor]

_BUCKET_NUMEL = 1 << 22
# Products are formed in at least float32 (low-precision tensors are upcast per bucket) and, on the
# multi-tensor path, summed in float64.
_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def new_snapshot(params: Tensors) -> list[torch.Tensor]:
    """Allocate a buffer shaped like ``params`` (contents undefined)."""
    return [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]


def snapshot_fits(snapshot: Tensors | None, params: Tensors) -> bool:
    """True when ``snapshot`` can hold a copy of ``params`` (same shapes, dtypes and devices)."""
    return (
        snapshot is not None
        and len(snapshot) == len(params)
        and all(s.shape == p.shape and s.dtype == p.dtype and s.device == p.device for s, p in zip(snapshot, params))
    )


def copy_(destination: Tensors, source: Tensors, *, foreach: bool = True) -> None:
    """``destination[i] <- source[i]`` for every i, bit for bit."""
    if foreach and len(destination) > 0:
        torch._foreach_copy_(list(destination), list(source))
    else:
        for dst, src in zip(destination, source):
            dst.copy_(src)


def _inf_norms(tensors: Tensors, foreach: bool) -> list[torch.Tensor]:
    """The infinity norm (max of absolute values) of each non-empty tensor.

    A max cannot overflow the way a sum of squares does on large finite values, and it is NaN
    when any element is. Empty tensors are skipped: their max has no identity, torch raises.
    """
    nonempty = [t for t in tensors if t.numel() > 0]
    if not nonempty:
        return []
    if foreach:
        return list(torch._foreach_norm(nonempty, math.inf))
    return [torch.linalg.vector_norm(t, math.inf) for t in nonempty]


def all_finite(tensors: Tensors, *, foreach: bool = True) -> torch.Tensor:
    """A boolean scalar tensor on the first tensor's device: no element is NaN or infinite."""
    norms = _inf_norms(tensors, foreach)
    if not norms:
        return torch.tensor(True, device=tensors[0].device if len(tensors) else None)
    device = norms[0].device
    return torch.stack([n.isfinite().to(device) for n in norms]).all()


def any_nonzero(tensors: Tensors, *, foreach: bool = True) -> bool:
    """True when some element of ``tensors`` is not zero (NaN counts as not zero). Syncs once."""
    norms = _inf_norms(tensors, foreach)
    if not norms:
        return False
    device = norms[0].device
    return bool(torch.stack([(n != 0).to(device) for n in norms]).any())


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _buckets(indices: list[int], sizes: list[int]) -> list[list[int]]:
    buckets: list[list[int]] = [[]]
    filled = 0
    for i in indices:
        if buckets[-1] and filled + sizes[i] > _BUCKET_NUMEL:
            buckets.append([])
            filled = 0
        buckets[-1].append(i)
        filled += sizes[i]
    return buckets


def step_dot(grads: Tensors, snapshot: Tensors, params: Tensors, *, foreach: bool = True) -> torch.Tensor:
    """Return ``sum_i <grads[i], snapshot[i] - params[i]>`` as a float64 scalar tensor.

    With ``snapshot = theta_t`` and ``params = theta_{t+1}`` this is ``<grad, d>`` for the step
    ``d``. Complex tensors use the real inner product (that of their real views). A ``None``
    gradient contributes zero. The result lives on the device of the first tensor.
    """
    triples = [(g, s, p) for g, s, p in zip(grads, snapshot, params) if g is not None]
    if not triples:
        device = params[0].device if len(params) else torch.device("cpu")
        return torch.zeros((), dtype=torch.float64, device=device)
    if any(s.is_complex() for _, s, _ in triples):
        triples = [(_as_real(g), _as_real(s), _as_real(p)) for g, s, p in triples]
    result_device = triples[0][2].device
    if not foreach:
        parts = [_dot(g.to(s.dtype), _widened(s) - _widened(p)) for g, s, p in triples]
        return torch.stack([x.to(result_device) for x in parts]).sum()

    # Each call pays per kernel launch, and a small model's step is short: the usual case (one
    # device, one dtype, one bucket) runs exactly the kernels of the general loop, minus its
    # bookkeeping, so both give the same bits.
    first = triples[0][1]
    sizes = [s.numel() for _, s, _ in triples]
    if sum(sizes) <= _BUCKET_NUMEL and all(s.dtype == first.dtype and s.device == first.device for _, s, _ in triples):
        return _bucket_dot(*_columns(triples), first.dtype)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, (_, s, _) in enumerate(triples):
        groups[(s.device, s.dtype)].append(i)
    partial_sums = [
        _bucket_dot(*_columns([triples[i] for i in bucket]), dtype).to(result_device)
        for (_, dtype), indices in groups.items()
        for bucket in _buckets(indices, sizes)
    ]
    return torch.stack(partial_sums).sum()


def uniform(tensors: Tensors) -> bool:
    """Whether ``tensors`` take :func:`step_dot`'s usual path: one device, one real dtype, one bucket."""
    first = tensors[0]
    return (
        not first.is_complex()
        and sum(t.numel() for t in tensors) <= _BUCKET_NUMEL
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
    )


def uniform_step_dot(grads: Tensors, snapshot: Tensors, params: Tensors) -> torch.Tensor:
    """:func:`step_dot` (multi-tensor) for a ``snapshot`` that is :func:`uniform` and gradients that
    are all present: the same kernels, without the checks that a caller who knows this can skip."""
    return _bucket_dot(grads, snapshot, params, snapshot[0].dtype)


def _columns(triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[list, list, list]:
    return [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples]


def _bucket_dot(g: Tensors, s: Tensors, p: Tensors, dtype: torch.dtype) -> torch.Tensor:
    """``sum <g, s - p>`` over same-dtype, same-device tensors, with one temporary per tensor."""
    g, s, p = list(g), list(s), list(p)
    wide = _ACCUMULATE.get(dtype)
    if wide is not None:  # upcast before subtracting: the step of bf16 weights is not bf16
        s, p, g = [x.to(wide) for x in s], [x.to(wide) for x in p], [x.to(wide) for x in g]
    deltas = torch._foreach_sub(s, p)
    g = [x if x.dtype == d.dtype else x.to(d.dtype) for x, d in zip(g, deltas)]
    torch._foreach_mul_(deltas, g)
    # One reduction over all the products: a fixed number of kernels per bucket, however many
    # tensors it holds (a dot per tensor costs a launch each), summed in float64.
    return torch.cat([d.reshape(-1) for d in deltas]).sum(dtype=torch.float64)


def _widened(t: torch.Tensor) -> torch.Tensor:
    wide = _ACCUMULATE.get(t.dtype)
    return t if wide is None else t.to(wide)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One inner product, accumulated in at least float32, returned as float64."""
    wide = _ACCUMULATE.get(a.dtype)
    if wide is not None:
        a, b = a.to(wide), b.to(wide)
    return torch.dot(a.reshape(-1), b.reshape(-1)).to(torch.float64)

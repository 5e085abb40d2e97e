"""Slow, obviously correct references the fast code is checked against.

Nothing here imports newt's kernels: every number is recomputed with plain per-parameter loops
in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def reference_measurements(
    params: Sequence[torch.Tensor], inner: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]
) -> dict[str, float]:
    """Take one inner step by hand and return f0, f1, d0, d1 as docs/math.md defines them.

    Leaves the parameters at the lookahead point, like ``Newt.step``. The closure must be
    deterministic (no dropout): this reference does not replay random state.
    """
    theta0 = [p.detach().clone() for p in params]
    with torch.enable_grad():
        f0 = float(closure().detach())
    grads0 = [None if p.grad is None else p.grad.detach().clone() for p in params]
    inner.step()
    steps = [t0.double() - p.detach().double() for t0, p in zip(theta0, params)]
    d0 = sum(float((g.double() * d).sum()) for g, d in zip(grads0, steps) if g is not None)
    for p in params:
        p.grad = None
    with torch.enable_grad():
        f1 = float(closure().detach())
    d1 = sum(float((p.grad.double() * d).sum()) for p, d in zip(params, steps) if p.grad is not None)
    return {"f0": f0, "f1": f1, "d0": d0, "d1": d1}


def per_tensor_step_dot(
    grads: Sequence[torch.Tensor | None], before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]
) -> float:
    """``sum_i <grads[i], before[i] - after[i]>`` with one float64 loop per tensor."""
    total = 0.0
    for g, b, a in zip(grads, before, after):
        if g is None:
            continue
        if g.is_complex():
            g, b, a = torch.view_as_real(g), torch.view_as_real(b), torch.view_as_real(a)
        total += float((g.double() * (b.double() - a.double())).sum())
    return total


def random_quadratic(seed: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, b, x)``: a random SPD quadratic ``0.5 x^T A x - b^T x`` in float64 and a start ``x``.

    ``A = M M^T + 0.5 I`` keeps the curvature bounded away from zero; ``x`` requires grad.
    """
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    x = torch.randn(dim, generator=gen, dtype=torch.float64).requires_grad_()
    return a, b, x

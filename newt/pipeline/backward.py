"""How the closure's ``backward()`` runs during one measurement call: skipped, or handed to Newt.

A lookahead call whose gradient no rule reads (``gen``, ``gen-three-point``) needs only the loss,
and the call that measures the curvature of ``gen-exact`` needs the gradient *with its graph*.
The closure is the user's, unchanged: it calls ``loss.backward()`` as always. For the length of
one call, :func:`intercepted_backward` installs a :class:`torch.overrides.TorchFunctionMode` that
catches ``Tensor.backward`` and ``torch.autograd.backward`` and records what they were asked to
differentiate instead of running them. Torch keeps its stack of function modes per thread, so
the interception affects only the thread that runs the step, and it ends with the call, also
when the closure raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["BackwardRequest", "Intercepted", "curvature_along", "intercepted_backward"]

_BACKWARDS = (torch.Tensor.backward, torch.autograd.backward)


@dataclass(frozen=True)
class BackwardRequest:
    """What one ``backward()`` call of the closure asked for: the outputs and their upstream gradients."""

    outputs: tuple[torch.Tensor, ...]
    grad_outputs: tuple[torch.Tensor | None, ...]


def _request(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> BackwardRequest:
    if func is torch.Tensor.backward:
        gradient = args[1] if len(args) > 1 else kwargs.get("gradient")
        return BackwardRequest((args[0],), (gradient,))
    tensors = args[0] if args else kwargs["tensors"]
    gradients = args[1] if len(args) > 1 else kwargs.get("grad_tensors")
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    if gradients is None or isinstance(gradients, torch.Tensor):
        gradients = (gradients,) * len(tensors) if gradients is None else (gradients,)
    return BackwardRequest(tensors, tuple(gradients))


class Intercepted(TorchFunctionMode):
    """The function mode of one call: every ``backward()`` is recorded in ``requests``, not run,
    and ``instead()`` is called in its place."""

    def __init__(self, instead: Callable[[], None]) -> None:
        super().__init__()
        self.requests: list[BackwardRequest] = []
        self.instead = instead

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _BACKWARDS:
            self.requests.append(_request(func, args, kwargs))
            self.instead()
            return None
        return func(*args, **kwargs)


@contextmanager
def intercepted_backward(*, graph: bool, instead: Callable[[], None]) -> Iterator[Intercepted]:
    """Catch the closure's ``backward()`` calls for the length of the ``with`` block.

    Args:
        graph: Run the block with gradient recording on (the requests are differentiated
            afterwards) or off (forward only: no graph is built, the requests are dropped).
        instead: Called in place of each ``backward()``: it puts gradients in ``.grad``, so
            that what the closure does after its ``backward()`` (clipping, logging a gradient
            norm, a Lightning hook) finds some.
    """
    mode = Intercepted(instead)
    with torch.set_grad_enabled(graph), mode:
        yield mode


def curvature_along(
    requests: Sequence[BackwardRequest], params: Sequence[torch.Tensor], step: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``d^T H d`` for the step ``d`` (one tensor per parameter), from the recorded ``backward()`` calls.

    Two reverse passes: the gradient with its graph, then the gradient of ``<grad, d>``, the
    Hessian-vector product ``H d``. Parameters the loss does not reach contribute nothing.
    Returns a float64 scalar on the parameters' device (no host sync); zero when the gradient
    does not depend on the parameters (a loss linear in them).
    """
    zero = torch.zeros((), dtype=torch.float64, device=step[0].device)
    with torch.enable_grad():
        grads = _gradients_with_graph(requests, params)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:
            return zero
        # on one device: a model may spread its parameters over several
        directional = torch.stack([(grads[i] * step[i]).sum().to(zero.device) for i in used]).sum()
        products = torch.autograd.grad(directional, [params[i] for i in used], allow_unused=True)
    return zero + sum(_dot(hv, step[i]).to(zero.device) for hv, i in zip(products, used) if hv is not None)


def _gradients_with_graph(
    requests: Sequence[BackwardRequest], params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    outputs = [t for request in requests for t in request.outputs]
    grad_outputs = [g for request in requests for g in request.grad_outputs]
    return torch.autograd.grad(outputs, params, grad_outputs, create_graph=True, allow_unused=True)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.float64) * b.to(torch.float64)).sum()

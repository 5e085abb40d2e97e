"""Run the lookahead closure call without side effects.

Note [side-effect-free lookahead]: the second closure call must measure the *same* function as
the first, at another point. Two things would otherwise differ or leak:

- random state: dropout masks (and anything else drawn from torch's generators) must repeat, so
  the call replays the generator state the first call started from, and afterwards the
  generators continue from where the first call left them, as if the lookahead never ran;
- module buffers: BatchNorm's running statistics (and ``num_batches_tracked``) must not be
  updated a second time. Newt has no reference to the model, only to its parameters, so a
  global forward pre-hook, installed only for the duration of the call, snapshots the buffers of
  every module the closure runs and puts them back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


class RngState:
    """The state of torch's CPU generator and of the CUDA generators of some devices."""

    def __init__(self, cuda_devices: Sequence[torch.device]) -> None:
        self._devices = list(cuda_devices)
        self._cpu = torch.get_rng_state()
        self._cuda = [torch.cuda.get_rng_state(d) for d in self._devices]

    def restore(self) -> None:
        torch.set_rng_state(self._cpu)
        for device, state in zip(self._devices, self._cuda):
            torch.cuda.set_rng_state(state, device)


def cuda_devices(params: Sequence[torch.Tensor]) -> list[torch.device]:
    """The distinct CUDA devices among ``params``."""
    return sorted({p.device for p in params if p.device.type == "cuda"}, key=str)


class BufferRecord:
    """The module buffers as they were before the forward passes run while recording."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[nn.Module, list[tuple[str, torch.Tensor, torch.Tensor]]]] = {}

    @torch.no_grad()
    def restore(self) -> None:
        """Put every recorded buffer back as it was."""
        for module, entries in self.saved.values():
            for name, original, copy in entries:
                if module._buffers.get(name) is not original:  # a forward that rebinds, not mutates
                    module._buffers[name] = original
                original.copy_(copy)


@contextlib.contextmanager
def recorded_module_buffers() -> Iterator[BufferRecord]:
    """Record the module buffers the enclosed forward passes are about to change (BatchNorm's
    running statistics), so that the caller can put them back with ``restore()``."""
    record = BufferRecord()
    saved = record.saved

    # A plain function, not a bound method: torch.compile guards on the global hooks, and a
    # new bound method every step would make it recompile.
    def remember(module: nn.Module, args: object) -> None:
        if id(module) in saved:  # saved with its whole subtree: nothing new below it
            return
        # The whole subtree, not just the module called: inside a torch.compile'd graph the
        # submodules' own forward hooks never fire, only the outermost module's does.
        for sub in module.modules():
            if id(sub) in saved:  # a module called twice: its state before the first call counts
                continue
            saved[id(sub)] = (
                sub,
                [(name, buf, buf.detach().clone()) for name, buf in sub._buffers.items() if buf is not None],
            )

    with _global_forward_pre_hook(remember):
        yield record


_HOOK_KEY = -0x6E657774  # the key Newt's hook takes in torch's registry of global forward pre-hooks


@contextlib.contextmanager
def _global_forward_pre_hook(hook: Callable[[nn.Module, object], None]) -> Iterator[None]:
    """Install ``hook`` as a global forward pre-hook for the enclosed code, always under one key.

    torch.compile guards a compiled module on the keys of the global hooks, and the usual
    ``register_module_forward_pre_hook`` takes a new key every time: installing a hook for each
    closure call would make it recompile at every step. One fixed key, in the same registry,
    keeps the guard true. Where the key is taken (another Newt stepping in another thread) or
    the registry is not where torch keeps it, the usual registration is used.
    """
    registry = getattr(nn.modules.module, "_global_forward_pre_hooks", None)
    if not isinstance(registry, dict) or _HOOK_KEY in registry:
        handle = nn.modules.module.register_module_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        return
    registry[_HOOK_KEY] = hook
    try:
        yield
    finally:
        registry.pop(_HOOK_KEY, None)


@contextlib.contextmanager
def frozen_module_buffers() -> Iterator[None]:
    """Undo, on exit, every change the enclosed forward passes make to module buffers."""
    with recorded_module_buffers() as record:
        try:
            yield
        finally:
            record.restore()


@contextlib.contextmanager
def replayed_rng(start: RngState) -> Iterator[None]:
    """Run the enclosed code from the generator state ``start``; restore the current state after."""
    now = RngState(start._devices)
    start.restore()
    try:
        yield
    finally:
        now.restore()

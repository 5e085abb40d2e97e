"""The tensor work of a step: the snapshot buffer, the dot products along the step, the one
reduction across ranks, and the checks that need the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from newt import _kernels
from newt.distributed import agree_all, agree_any, is_dtensor, reduce_measurements, sharded

__all__ = ["Measurer"]


class Measurer:
    """Holds the one parameter-sized buffer (a snapshot of ``theta_t``) and measures along the step.

    Args:
        foreach: Use the multi-tensor kernels (see :mod:`newt._kernels`).
        process_group: The ranks that must agree (None: the world, when initialised).
    """

    def __init__(self, foreach: bool, process_group: torch.distributed.ProcessGroup | None) -> None:
        self.foreach = foreach
        self.process_group = process_group
        self.sharded = False  # DTensor shards (FSDP2): the dot products are partial sums
        self.dtensors = False  # some parameter is a DTensor: the tensor work runs on its local shard
        self.buffer: list[torch.Tensor] | None = None
        self._uniform = False  # the buffer takes the dot products' usual path (see _kernels.uniform)
        self.writes = 0  # how many snapshots the buffer has taken: a step that raised may have overwritten it
        self.spare: list[torch.Tensor] | None = None  # theta_{t+1}, while a measurement visits other points

    def watch(self, params: Sequence[torch.Tensor]) -> None:
        """Take note of the parameters (at construction and when a param group is added)."""
        self.sharded = sharded(params)
        self.dtensors = any(is_dtensor(p) for p in params)

    # ------------------------------------------------------------------ the snapshot buffer

    def snapshot(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``local`` into the reused buffer (reallocated only if the parameters change)."""
        if not _kernels.snapshot_fits(self.buffer, local):
            self.buffer = None  # free the old buffer before allocating the new one
            self.buffer = _kernels.new_snapshot(local)
            self._uniform = self.foreach and _kernels.uniform(self.buffer)
        _kernels.copy_(self.buffer, local, foreach=self.foreach)
        self.writes += 1
        return self.buffer

    def restore(self, local: list[torch.Tensor]) -> None:
        """Put the parameters back at the snapshot, bit for bit."""
        _kernels.copy_(local, self.buffer, foreach=self.foreach)

    # ------------------------------------------------------------------ visiting other points on the line

    def park(self, local: list[torch.Tensor]) -> None:
        """Keep ``theta_{t+1}`` (the parameters now) in the spare buffer, allocated on first use.

        Only the strategies that measure away from the lookahead point use it (``gen-exact``,
        ``gen-three-point``): their steps hold a second parameter-sized buffer.
        """
        if not _kernels.snapshot_fits(self.spare, local):
            self.spare = None
            self.spare = _kernels.new_snapshot(local)
        _kernels.copy_(self.spare, local, foreach=self.foreach)

    def unpark(self, local: list[torch.Tensor]) -> None:
        """Put the parameters back at ``theta_{t+1}``, bit for bit."""
        _kernels.copy_(local, self.spare, foreach=self.foreach)

    def reflect(self, local: list[torch.Tensor]) -> None:
        """Move the parameters to ``theta_t + d = 2 theta_t - theta_{t+1}`` (after :meth:`park`)."""
        _kernels.copy_(local, self.buffer, foreach=self.foreach)
        if self.foreach:
            torch._foreach_mul_(local, 2.0)
            torch._foreach_sub_(local, self.spare)
        else:
            for param, end in zip(local, self.spare):
                param.mul_(2.0).sub_(end)

    def step_vectors(self) -> list[torch.Tensor]:
        """The step ``d = theta_t - theta_{t+1}``, one new tensor per parameter (after :meth:`park`)."""
        return [start - end for start, end in zip(self.buffer, self.spare)]

    def holds(self, local: list[torch.Tensor]) -> bool:
        """Whether the buffer has the shapes of ``local`` (what it holds is the caller's business)."""
        return _kernels.snapshot_fits(self.buffer, local)

    def load(self, local: list[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
        """Fill the buffer from a checkpoint, on the devices and in the dtypes of ``local``."""
        self.buffer = [
            tensor.to(device=shard.device, dtype=shard.dtype, copy=True) for shard, tensor in zip(local, saved)
        ]

    # ------------------------------------------------------------------ measurements

    def dots(self, grads: list[torch.Tensor | None], local: list[torch.Tensor], units: list[list[int]]) -> torch.Tensor:
        """``<grad, snapshot - param>`` per unit, as a float64 vector on the device (no sync)."""
        if len(units) == 1:
            if self._uniform and all(g is not None for g in grads):
                return _kernels.uniform_step_dot(grads, self.buffer, local).reshape(1)
            return _kernels.step_dot(grads, self.buffer, local, foreach=self.foreach).reshape(1)
        dots = [
            _kernels.step_dot(
                [grads[i] for i in unit], [self.buffer[i] for i in unit], [local[i] for i in unit], foreach=self.foreach
            )
            for unit in units
        ]
        return torch.stack([dot.to(dots[0].device) for dot in dots])

    def reduce(self, values: torch.Tensor, n_losses: int) -> list[float]:
        """The step's scalars agreed across ranks (losses averaged), read on the host: the one sync."""
        return reduce_measurements(values, n_losses, is_sharded=self.sharded, group=self.process_group).tolist()

    def finite(self, f0: torch.Tensor | None, grads: list[torch.Tensor | None]) -> bool:
        """Whether the loss (if given) and every gradient are finite, on every rank (one host sync)."""
        finite = _kernels.all_finite(grads, foreach=self.foreach)
        if f0 is not None:
            finite = finite & f0.to(finite.device).isfinite()
        # every rank must take the same branch (one rank's NaN stops the step everywhere)
        return bool(agree_all(finite, self.process_group))

    def nonzero(self, grads: list[torch.Tensor | None]) -> bool:
        """Whether some gradient entry is not zero, on some rank (the rare check of a vanished step)."""
        present = [g for g in grads if g is not None]
        nonzero = _kernels.any_nonzero(present, foreach=self.foreach)
        return agree_any(nonzero, present[0].device if present else torch.device("cpu"), self.process_group)

"""Closure-free mode, ``loss.backward(); opt.step()``: the next batch's gradient stands in for the
lookahead's, so the rate of a step is adapted at the start of the next one.

Step t measures ``d1 = <g_t, d_{t-1}>`` with the previous step ``d_{t-1}`` still in the snapshot
buffer (``theta_{t-1} - theta_t``), adapts the rate from the sums over a block of
``update_every`` steps, then takes its own inner step and measures ``d0 = <g_t, d_t>`` for the
next step to complete. Given the loss (``opt.step(loss=loss)``), it also runs the start-up test
on consecutive batches and, after the start, the blow-up check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from newt import _checkpoint as checkpoint
from newt._numerics import Decision
from newt._state import Pending, State
from newt.distributed import local_tensor
from newt.modes.base import Mode
from newt.modes.noise import Restore
from newt.pipeline.decide import Measured, decide
from newt.pipeline.gather import Gathered, as_float64, checked_loss, gather, loss_eps
from newt.pipeline.measure import Measurer
from newt.policies import is_spike, loss_resolution, next_batch_verdict

__all__ = ["ClosureFree"]

Block = tuple["torch.Tensor | None", "torch.Tensor | None", int]
"""The sums of ``d0`` and ``d1`` over the steps of the current block so far, and their number."""

NO_GRADIENT = (
    "Newt.step() without a closure needs the gradients of the current batch: call "
    "loss.backward() before opt.step(), or pass a closure."
)


class ClosureFree(Mode):
    """No extra pass; ``retsinas`` and ``gen``; given the loss, the start-up test and the blow-up check."""

    name = "closure-free"
    policies = {
        "spike_threshold": "given the loss, until a step passes (the tolerance between two batches)",
        "reject_spikes": "given the loss, after the start (a blow-up)",
        "start_armijo": "given the loss, until a step passes",
        "blow_up_threshold": "given the loss, after the start",
        "reject_nonfinite": "every step",
    }

    def step(self, state: State, loss: torch.Tensor | float | None) -> None:
        self._check_strategy()
        if loss is not None:
            loss = checked_loss(loss, "loss=")  # on every step, though it is read only at the start
        gathered = gather(self.param_groups, state.rates, self.settings.per_group, NO_GRADIENT, self.measurer.dtensors)
        grads = gathered.grads()
        if self.stops_before_step(state, None, gathered):
            state.pending = None  # the measurement in progress would be NaN
            return None
        pending = state.pending
        if pending is not None and not self._continues(pending, gathered):
            pending = None  # other parameters moved: start a new measurement
        loss_value, watched, undone = self._read_loss(state, loss, pending, gathered)
        block: Block = (None, None, 0)  # the sums over the block so far, and its length
        adapted = False
        if pending is not None and not undone:
            block, adapted, undone = self._complete(state, pending, gathered, grads, watched, checked=loss is not None)
        if undone:
            return None
        try:
            _, clip = self.inner_step(gathered)
        except BaseException:
            state.pending = None
            raise
        d0 = self.measurer.dots(grads, gathered.local, gathered.units)
        if clip is not None:  # measured with the clipped gradient: the unclipped one's slope
            d0 = d0 / clip
        state.pending = Pending(tuple(gathered.active), d0, *block, loss_value)
        if not adapted:
            self.record_plain(state, math.nan)
        return None

    def _check_strategy(self) -> None:
        strategy = self.settings.strategy
        if strategy.without_losses is None:
            raise ValueError(
                f"Newt.step was called without a closure, but strategy {strategy.name!r} calls the closure "
                "again along the step (the loss at the lookahead point, for some strategies also at theta_t + d "
                "or a Hessian-vector product), which needs one: pass a closure that clears the gradients, "
                "computes the loss on the current batch, calls backward() and returns the loss, as in "
                "opt.step(closure); or use strategy='retsinas' or 'gen', which also work without a closure."
            )

    def _read_loss(
        self, state: State, loss: torch.Tensor | float | None, pending: Pending | None, gathered: Gathered
    ) -> tuple[float | None, torch.Tensor | float | None, bool]:
        """What the given loss is for: the start-up test (while the start is on probation, read
        now) or the blow-up check (after it, read with the measurements).

        Returns the loss read for the start-up test, the loss the blow-up check is to read, and
        whether the start-up test undid the previous step.
        """
        if loss is None:
            return None, None, False
        if self.settings.start.on_probation(state):
            loss_value, undone = self._start_test(state, as_float64(loss), loss_eps(loss), pending, gathered)
            return loss_value, None, undone
        return None, (loss if self.settings.blow_up.active else None), False

    @staticmethod
    def _continues(pending: Pending, gathered: Gathered) -> bool:
        """Whether the same parameters moved as in the step that left ``pending``."""
        active = gathered.active
        same = len(pending.params) == len(active) and all(p is q for p, q in zip(pending.params, active))
        return same and pending.d0.numel() == len(gathered.units)

    def _complete(
        self,
        state: State,
        pending: Pending,
        gathered: Gathered,
        grads: list[torch.Tensor | None],
        watched: torch.Tensor | float | None,
        checked: bool,
    ) -> tuple[Block, bool, bool]:
        """Measure the previous step's ``d1`` and, at the end of a block, adapt the rate.

        Returns the block's sums so far (reset when the block ends), whether the rate was
        adapted, and whether the previous step was undone (a blow-up).
        """
        # d_{t-1} = theta_{t-1} - theta_t, with theta_{t-1} still in the snapshot buffer
        d1 = self.measurer.dots(grads, gathered.local, gathered.units)
        block_d0 = pending.d0 if pending.block_d0 is None else pending.block_d0 + pending.d0
        block_d1 = d1 if pending.block_d1 is None else pending.block_d1 + d1
        count = pending.count + 1
        if count < self.settings.update_every:  # (a checkpoint of a longer block may resume past it)
            return (block_d0, block_d1, count), False, False
        # The loss rides along in the transfer the measurements make anyway: no extra sync.
        losses = [] if watched is None else [as_float64(watched).reshape(1).to(d1.device)]
        values = self.measurer.reduce(torch.cat([*losses, block_d0.to(d1.device), block_d1]), len(losses))
        f = values.pop(0) if losses else math.nan
        n = len(gathered.units)
        d0s, d1s = values[:n], values[n:]
        reference = state.loss_reference
        if self.settings.blow_up.fires(reference, f):
            if self.settings.checks.spike.reject:
                self._undo(state, Measured(reference, f, d0s, d1s), gathered, Decision.SPIKE)
                return (None, None, 0), True, True
            proposals = self.shrunk(state, gathered.unit_groups, Decision.SPIKE)
            self.record(state, Measured(reference, f, d0s, d1s), gathered.unit_groups, proposals, rejected=False)
        else:
            if reference is None and math.isfinite(f):
                state.loss_reference = f
            self._adapt(state, gathered, grads, d0s, d1s, checked and self.settings.blow_up.active)
        return (None, None, 0), True, False

    def _adapt(
        self,
        state: State,
        gathered: Gathered,
        grads: list[torch.Tensor | None],
        d0s: list[float],
        d1s: list[float],
        checked: bool,
    ) -> None:
        settings = self.settings
        rule = settings.strategy.given_loss if checked else settings.strategy.without_losses
        verdict = decide(
            Measured(None, None, d0s, d1s),
            [state.rates.groups[g] for g in gathered.unit_groups],
            [0.0] * len(gathered.units),
            rule,
            settings.checks,
            probation=settings.start.on_probation(state),
            gradient_nonzero=lambda unit: self.measurer.nonzero(gathered.split(grads)[unit]),
        )
        self.record(
            state, Measured(math.nan, math.nan, d0s, d1s), gathered.unit_groups, verdict.proposals, rejected=False
        )

    def _start_test(
        self,
        state: State,
        loss: torch.Tensor,
        eps: float,
        pending: Pending | None,
        gathered: Gathered,
    ) -> tuple[float, bool]:
        """The start-up test of closure-free mode, on the losses given as ``step(loss=...)``.

        ``loss`` is this batch's loss at ``theta_t``; ``pending`` holds the previous step's loss
        (its batch, at ``theta_{t-1}``) and slope ``d0``, with ``theta_{t-1}`` in the snapshot
        buffer. The two losses come from different batches, so the Armijo condition gets the
        spike threshold as a tolerance (:func:`newt.policies.next_batch_verdict`); a fall by the
        Armijo share proves the rate. A failed step is undone, like a failed start in lookahead
        mode and whatever ``reject_spikes`` says: ``theta_{t-1}`` comes back from the snapshot,
        the rate shrinks, and this batch's gradients, taken at the point given up, are not
        used. Returns the loss (reduced across ranks) and whether the step was undone.
        """
        device = gathered.local[0].device  # where the collective runs (NCCL needs the GPU)
        parts = [loss.reshape(1).to(device)] + ([] if pending is None else [pending.d0.to(device)])
        values = self.measurer.reduce(torch.cat(parts), 1)
        f1 = values[0]
        if state.loss_reference is None and math.isfinite(f1):
            state.loss_reference = f1
        if pending is None or pending.loss is None:
            return f1, False
        f0, d0s = pending.loss, values[1:]
        threshold = self.settings.checks.spike.threshold
        resolution = loss_resolution(eps, f0, f1)
        verdict = next_batch_verdict(f0, f1, math.fsum(d0s), self.settings.start.armijo, threshold, resolution)
        if verdict is not False:
            state.start_proven = verdict is True
            return f1, False
        decision = Decision.SPIKE if is_spike(f0, f1, threshold) or not math.isfinite(f1) else Decision.INSUFFICIENT
        self._undo(state, Measured(f0, f1, d0s, [math.nan] * len(gathered.units)), gathered, decision)
        return f1, True

    def _undo(self, state: State, measured: Measured, gathered: Gathered, decision: Decision) -> None:
        """Undo the last closure-free step: ``theta_{t-1}`` back from the snapshot, the rate shrunk,
        no inner step from the point given up (its gradients were taken there)."""
        self.measurer.restore(gathered.local)
        state.pending = None
        self.record(
            state, measured, gathered.unit_groups, self.shrunk(state, gathered.unit_groups, decision), rejected=True
        )

    # ------------------------------------------------------------------ state_dict fragment

    def state_dict(self, state: State, params: Sequence[torch.Tensor], measurer: Measurer) -> dict[str, Any]:
        """``pending`` (the measurement in progress needs ``theta_{t-1}``) and ``given_loss``."""
        given = None if state.given_loss is None else float(state.given_loss)
        pending = state.pending
        if pending is None:
            return {"pending": None, "given_loss": given}
        index = {id(p): i for i, p in enumerate(params)}
        return {
            "pending": {
                "indices": [index[id(p)] for p in pending.params],
                "snapshot": list(measurer.buffer),
                "d0": pending.d0,
                "block_d0": pending.block_d0,
                "block_d1": pending.block_d1,
                "count": pending.count,
                "loss": pending.loss,
            },
            "given_loss": given,
        }

    def load_state_dict(self, state: State, saved: Mapping[str, Any], restore: Restore) -> None:
        # given_loss and the loss are absent from checkpoints made before the loss could be given
        state.given_loss = checkpoint.number(saved.get("given_loss"), "given_loss", optional=True, finite=False)
        state.pending = None
        pending = saved.get("pending")
        if pending is None:
            return
        params = restore(pending["indices"], pending["snapshot"], "closure-free measurement")
        device = local_tensor(params[0]).device
        d0 = checkpoint.tensor(pending["d0"], "pending.d0")
        units = d0.shape

        def moved(tensor: torch.Tensor | None, key: str) -> torch.Tensor | None:
            tensor = checkpoint.tensor(tensor, key, shape=units, optional=True)
            return None if tensor is None else tensor.to(device=device, copy=True)

        state.pending = Pending(
            tuple(params),
            moved(d0, "pending.d0"),
            moved(pending["block_d0"], "pending.block_d0"),
            moved(pending["block_d1"], "pending.block_d1"),
            checkpoint.count(pending["count"], "pending.count"),
            checkpoint.number(pending.get("loss"), "pending.loss", optional=True, finite=False),
        )

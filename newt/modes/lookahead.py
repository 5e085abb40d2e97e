"""Lookahead mode, ``opt.step(closure)``: the closure at ``theta_t``, the inner step, the closure
again at the lookahead point on the same batch, then the rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from newt._isolation import RngState, cuda_devices, frozen_module_buffers, replayed_rng
from newt._numerics import Proposal
from newt._state import NoiseProbe, State
from newt.modes.base import Mode, Settings
from newt.modes.noise import NoiseCorrection
from newt.pipeline.decide import Measured, Verdict, decide
from newt.pipeline.gather import Gathered, gather, loss_eps, loss_tensor
from newt.pipeline.measure import Measurer
from newt.policies import RiseCheck

__all__ = ["Lookahead"]

NO_GRADIENT = (
    "after the closure ran, no parameter has a gradient: the closure must call "
    "loss.backward() before returning the loss."
)


class Lookahead(Mode):
    """Two closure calls per step; every rule; every step can be undone on the loss's evidence."""

    name = "lookahead"
    policies = {
        "spike_threshold": "every step",
        "reject_spikes": "every step",
        "start_armijo": "until a step passes",
        "hold_on_ascent": "every step",
        "noise_correction": "every step",
        "reject_nonfinite": "every step",
    }

    def __init__(self, inner: torch.optim.Optimizer, settings: Settings, measurer: Measurer) -> None:
        super().__init__(inner, settings, measurer)
        self.noise = NoiseCorrection(settings.noise_cap, settings.per_group)

    def step(self, state: State, closure: Callable[[], Any]) -> Any:
        params = [p for group in self.param_groups for p in group["params"]]
        rng_at_start = RngState(cuda_devices(params))
        loss, f0, buffers = self.first_call(closure)
        gathered = gather(self.param_groups, state.rates, self.settings.per_group, NO_GRADIENT, self.measurer.dtensors)
        if self.stops_before_step(state, f0, gathered, buffers):
            return loss
        return self.measured_step(state, closure, rng_at_start, loss, f0, gathered)

    def measured_step(
        self,
        state: State,
        closure: Callable[[], Any],
        rng_at_start: RngState,
        loss: Any,
        f0: torch.Tensor,
        gathered: Gathered,
        *,
        rose: bool = False,
    ) -> Any:
        """A lookahead step from its first closure call on: the inner step, the lookahead, the rule.

        ``rose``: a plain step measured because its loss rose sharply (lazy mode's rise check).
        """
        local, measurer = gathered.local, self.measurer
        grads = gathered.grads()
        probe = self.noise.fresh_probe(state, gathered, grads, measurer)
        measurer.snapshot(local)
        try:
            clip = self.clipped(gathered)
            self.inner.step()
            d0 = measurer.dots(grads, local, gathered.units)
            if clip is not None:  # measured with the clipped gradient: the unclipped one's slope
                d0 = d0 / clip
            del grads
            for p in gathered.active:  # the lookahead's gradient must not accumulate onto the first one
                p.grad = None
            with replayed_rng(rng_at_start), frozen_module_buffers():
                f1 = loss_tensor(closure(), "second (lookahead)")
            grads = gathered.grads()
            if all(g is None for g in grads):
                raise RuntimeError(
                    "the lookahead closure call produced no gradient: the closure must call "
                    "loss.backward() every time it is called."
                )
            measured, noise, keys = self._measure(state, gathered, f0, f1, d0, grads, probe)
            verdict = self._decide(state, gathered, measured, noise, grads, loss)
        except BaseException:
            measurer.restore(local)
            raise
        if verdict.rejected:
            measurer.restore(local)
        elif self.noise.active:  # theta_{t+1} stays: a fresh batch can measure there
            state.probe = NoiseProbe(tuple(gathered.active), keys, tuple(measured.d0s), tuple(measured.d1s))
        proposals, deferred = self.held_back(state, gathered.unit_groups, verdict.proposals, rose)
        self.record(state, measured, gathered.unit_groups, proposals, rejected=verdict.rejected, noise=noise)
        state.deferred = deferred
        return loss

    def _measure(
        self,
        state: State,
        gathered: Gathered,
        f0: torch.Tensor,
        f1: torch.Tensor,
        d0: torch.Tensor,
        grads: list[torch.Tensor | None],
        probe: NoiseProbe | None,
    ) -> tuple[Measured, list[float], tuple[int, ...]]:
        """The lookahead's slope, every scalar in one reduction, and the noise shares."""
        d1 = self.measurer.dots(grads, gathered.local, gathered.units)
        if self.settings.scaler is not None:  # the lookahead's gradients are still scaled
            d1 = d1 / self.settings.scaler.get_scale()
        device = d1.device
        parts = [torch.stack([f0.to(device), f1.to(device)]), d0.to(device), d1]
        if probe is not None:  # the previous step's fresh-batch slope rides along
            parts.append(probe.fresh.to(device))
        values = self.measurer.reduce(torch.cat(parts), 2)
        n = len(gathered.units)
        measured = Measured(values[0], values[1], values[2 : 2 + n], values[2 + n : 2 + 2 * n])
        state.recent_losses = RiseCheck.remembered(state.recent_losses, measured.f0)
        if probe is not None:
            self.noise.observed(state, probe, values[2 + 2 * n :])
        keys = self.noise.keys(gathered.unit_groups)
        return measured, self.noise.shares(state, keys), keys

    def _decide(
        self,
        state: State,
        gathered: Gathered,
        measured: Measured,
        noise: list[float],
        grads: list[torch.Tensor | None],
        loss: Any,
    ) -> Verdict:
        settings = self.settings
        rule = settings.strategy.without_losses if settings.per_group else settings.strategy.with_losses
        # Keeping the rate on an uphill step is safe only where every step is measured and a
        # spike undoes it (not in lazy mode, whose plain steps run at the kept rate unguarded);
        # a custom rule's answer to an uphill step is its own choice.
        hold_ascents = settings.checks.ascent.enabled and settings.update_every == 1 and rule.builtin
        verdict = decide(
            measured,
            [state.rates.groups[g] for g in gathered.unit_groups],
            noise,
            rule,
            settings.checks,
            probation=settings.start.on_probation(state),
            loss_eps=loss_eps(loss),
            hold_ascents=hold_ascents,
            gradient_nonzero=lambda unit: self.measurer.nonzero(gathered.split(grads)[unit]),
        )
        if verdict.proven:
            state.start_proven = True
        return verdict

    def held_back(
        self, state: State, unit_groups: Sequence[int], proposals: list[Proposal], rose: bool
    ) -> tuple[list[Proposal], Any]:
        """The proposals the next steps use, and a rate increase held back for later (lazy mode)."""
        return proposals, None

"""Lookahead mode, ``opt.step(closure)``: the closure at ``theta_t``, the inner step, the closure
again at the lookahead point on the same batch, then the rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from newt._isolation import RngState, cuda_devices, frozen_module_buffers, replayed_rng
from newt._numerics import Proposal
from newt._state import NoiseProbe, State
from newt.modes.base import Mode, Settings
from newt.modes.noise import NoiseCorrection
from newt.pipeline.backward import BackwardRequest, curvature_along, intercepted_backward
from newt.pipeline.decide import Measured, Verdict, decide
from newt.pipeline.gather import Gathered, gather, loss_eps, loss_tensor
from newt.pipeline.measure import Measurer
from newt.policies import RiseCheck
from newt.rules import RuleSpec

__all__ = ["Lookahead"]

NO_GRADIENT = (
    "after the closure ran, no parameter has a gradient: the closure must call "
    "loss.backward() before returning the loss."
)


class Looked(NamedTuple):
    """What a lookahead measured beyond ``f0`` and ``d0``: the lookahead loss, and by the rule's
    ``lookahead``, the slope there, the loss at ``theta_t + d``, or ``d^T H d`` (tensors, no sync)."""

    f1: torch.Tensor
    d1: torch.Tensor | None = None
    f_back: torch.Tensor | None = None
    curvature: torch.Tensor | None = None


def _lookahead_slopes(kind: str, losses: list[float], d0s: list[float], second: list[float]) -> list[float]:
    """Each unit's ``d1``: measured (``kind == "gradient"``), or else ``d0 - C``, the slope at the
    lookahead point of the parabola the step measured, of curvature ``C`` (``RuleSpec.lookahead``)."""
    if kind == "gradient":
        return second
    f0, f1 = losses[0], losses[1]
    if kind == "loss":  # the parabola through f0, d0 and f1
        curvatures = [2.0 * (f1 - f0 + d0) for d0 in d0s]
    elif kind == "three-point":  # through f_back, f0 and f1
        curvatures = [losses[2] - 2.0 * f0 + f1] * len(d0s)
    else:  # "hessian": d^T H d
        curvatures = second
    return [d0 - c for d0, c in zip(d0s, curvatures)]


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
        if self.rule.lookahead != "gradient" and self.measurer.dtensors:
            # FSDP2 may keep a module's all-gathered parameters (the root's) until its backward
            # pass: a call without one could leave the next calls computing with stale copies
            raise ValueError(
                f"strategy {self.rule.name!r} calls the closure without its backward pass (or, gen-exact, "
                "differentiates it twice), which sharded (DTensor, FSDP2) parameters do not support: use "
                "strategy='gen' (or 'auto') with forward_only unset or False there."
            )
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
            looked = self._look_keeping_gradients(closure, rng_at_start, gathered)
            measured, noise, keys = self._measure(state, gathered, f0, d0, looked, probe)
            verdict = self._decide(state, gathered, measured, noise, loss)
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

    @property
    def rule(self) -> RuleSpec:
        """The rule of a closure step (per-group rates read only the slopes; sharded parameters
        measure the lookahead's gradient where that is only the default's choice)."""
        strategy = self.settings.strategy
        if self.settings.per_group:
            return strategy.without_losses
        if self.measurer.dtensors and strategy.gradient_lookahead is not None:
            return strategy.gradient_lookahead
        return strategy.with_losses

    def _look_keeping_gradients(self, closure: Callable[[], Any], rng_at_start: RngState, gathered: Gathered) -> Looked:
        """:meth:`_look`, with ``theta_t``'s gradients in ``.grad`` wherever no gradient is computed:
        in place of each skipped ``backward()``, and after the calls (also when one raised)."""
        first_grads = [p.grad for p in gathered.active] if self.rule.lookahead != "gradient" else []

        def first_gradients() -> None:
            for p, g in zip(gathered.active, first_grads):
                p.grad = g

        for p in gathered.active:  # the lookahead's gradient must not accumulate onto the first one
            p.grad = None
        try:
            return self._look(closure, rng_at_start, gathered, first_gradients)
        finally:
            first_gradients()

    def _look(
        self, closure: Callable[[], Any], rng_at_start: RngState, gathered: Gathered, instead: Callable[[], None]
    ) -> Looked:
        """What the rule's lookahead measures, from ``theta_{t+1}`` (see ``RuleSpec.lookahead``).

        Every closure call replays the first call's random state and leaves the module buffers
        as they were. The parameters end at ``theta_{t+1}``. ``instead`` runs in place of each
        ``backward()`` a call skips (``theta_t``'s gradients go back into ``.grad``).
        """
        kind, measurer, local = self.rule.lookahead, self.measurer, gathered.local

        def call(which: str, *, backward: str, then: Callable[[list[BackwardRequest]], Any] | None = None) -> Any:
            """The loss of one closure call, or ``then`` of its caught ``backward()`` calls, run
            while the call's graph and module buffers are as the forward pass left them."""
            with replayed_rng(rng_at_start), frozen_module_buffers():
                if backward == "run":
                    with torch.enable_grad():
                        return loss_tensor(closure(), which)
                for p in gathered.active:  # a zero_grad(set_to_none=False) must not zero theta_t's
                    p.grad = None
                with intercepted_backward(graph=backward == "capture", instead=instead) as caught:
                    loss = loss_tensor(closure(), which)
                return loss if then is None else then(caught.requests)

        if kind == "gradient":
            f1 = call("second (lookahead)", backward="run")
            grads = gathered.grads()
            if all(g is None for g in grads):
                raise RuntimeError(
                    "the lookahead closure call produced no gradient: the closure must call "
                    "loss.backward() every time it is called."
                )
            d1 = measurer.dots(grads, local, gathered.units)
            if self.settings.scaler is not None:  # the lookahead's gradients are still scaled
                d1 = d1 / self.settings.scaler.get_scale()
            return Looked(f1, d1=d1)
        f1 = call("second (lookahead)", backward="skip")
        if kind == "loss":
            return Looked(f1)
        measurer.park(local)
        try:
            if kind == "three-point":
                measurer.reflect(local)
                f_back = call("third (behind the start)", backward="skip")
                return Looked(f1, f_back=f_back)
            return Looked(f1, curvature=self._curvature_at_start(call, gathered))
        finally:
            measurer.unpark(local)

    def _curvature_at_start(self, call: Callable[..., Any], gathered: Gathered) -> torch.Tensor:
        """``d^T H d`` at ``theta_t``: the closure called there with its ``backward()`` caught,
        then two reverse passes. The parameters are left at ``theta_t``."""
        step = self.measurer.step_vectors()
        self.measurer.restore(gathered.local)

        def curvature(requests: list[BackwardRequest]) -> torch.Tensor:
            if not requests:
                raise RuntimeError(
                    f"strategy {self.rule.name!r} differentiates the loss twice at theta_t, but the closure "
                    "did not call backward(): the closure must call loss.backward() every time it is called."
                )
            try:
                return curvature_along(requests, gathered.active, step)
            except RuntimeError as error:  # an operation without a second derivative, a compiled graph
                raise RuntimeError(
                    f"strategy {self.rule.name!r} differentiates the loss twice, and this model cannot be: "
                    f"{error}. Use strategy='gen-three-point' (forward passes only); a torch.compile'd "
                    "model can also be compiled without AOT autograd (backend='eager')."
                ) from error

        value = call("third (curvature at the start)", backward="capture", then=curvature)
        if self.settings.scaler is not None:  # the closure's backward() was given the scaled loss
            value = value / self.settings.scaler.get_scale()
        return value.reshape(1)

    def _measure(
        self,
        state: State,
        gathered: Gathered,
        f0: torch.Tensor,
        d0: torch.Tensor,
        looked: Looked,
        probe: NoiseProbe | None,
    ) -> tuple[Measured, list[float], tuple[int, ...]]:
        """Every scalar of the step in one reduction, the slopes the rule reads, and the noise shares."""
        device = d0.device
        losses = [f0, looked.f1] + ([] if looked.f_back is None else [looked.f_back])
        per_unit = [t for t in (d0, looked.d1, looked.curvature) if t is not None]
        parts = [torch.stack([loss.to(device) for loss in losses]), *(t.to(device) for t in per_unit)]
        if probe is not None:  # the previous step's fresh-batch slope rides along
            parts.append(probe.fresh.to(device))
        values = self.measurer.reduce(torch.cat(parts), len(losses))
        n, m = len(gathered.units), len(losses)
        f0_value, f1_value = values[0], values[1]
        d0s = values[m : m + n]
        d1s = _lookahead_slopes(self.rule.lookahead, values[:m], d0s, values[m + n : m + 2 * n])
        measured = Measured(f0_value, f1_value, d0s, d1s)
        state.recent_losses = RiseCheck.remembered(state.recent_losses, measured.f0)
        if probe is not None:
            self.noise.observed(state, probe, values[m + n * len(per_unit) :])
        keys = self.noise.keys(gathered.unit_groups)
        return measured, self.noise.shares(state, keys), keys

    def _decide(self, state: State, gathered: Gathered, measured: Measured, noise: list[float], loss: Any) -> Verdict:
        settings, rule = self.settings, self.rule
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
            gradient_nonzero=lambda unit: self.measurer.nonzero(gathered.split(gathered.grads())[unit]),
        )
        if verdict.proven:
            state.start_proven = True
        return verdict

    def held_back(
        self, state: State, unit_groups: Sequence[int], proposals: list[Proposal], rose: bool
    ) -> tuple[list[Proposal], Any]:
        """The proposals the next steps use, and a rate increase held back for later (lazy mode)."""
        return proposals, None

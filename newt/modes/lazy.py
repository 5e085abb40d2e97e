"""Lazy mode, ``update_every=K`` with a closure: a lookahead step every K-th step, plain inner
steps (one closure call) in between."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from newt import _checkpoint as checkpoint
from newt._isolation import RngState, cuda_devices
from newt._numerics import Proposal
from newt._state import Deferred, State
from newt.modes.lookahead import NO_GRADIENT, Lookahead
from newt.pipeline.gather import gather
from newt.policies import RiseCheck

__all__ = ["DEFERRAL", "Lazy"]


class Lazy(Lookahead):
    """Lookahead steps every ``update_every`` steps (and while the start is on probation, and
    for a plain step whose loss rose sharply); plain steps at the rate just tested otherwise."""

    name = "lazy"
    policies = {
        "spike_threshold": "lookahead steps",
        "reject_spikes": "lookahead steps",
        "start_armijo": "until a step passes (every step a lookahead step meanwhile)",
        "rise_threshold": "plain steps",
        "noise_correction": "lookahead steps",
        "reject_nonfinite": "every step",
    }

    def step(self, state: State, closure: Callable[[], Any]) -> Any:
        settings = self.settings
        if not state.steps % settings.update_every or settings.start.on_probation(state):
            return super().step(state, closure)
        params = [p for group in self.param_groups for p in group["params"]]
        watching = settings.rise.active
        # the RNG state a lookahead would replay, in case this step turns into one
        rng_at_start = RngState(cuda_devices(params)) if watching else None
        loss, f0, buffers = self.first_call(closure)
        gathered = gather(self.param_groups, state.rates, settings.per_group, NO_GRADIENT, self.measurer.dtensors)
        if self.stops_before_step(state, f0, gathered, buffers):
            return loss
        if watching:
            # every rank must take the same branch: the decision reads the batch's mean loss
            f0_value = self.measurer.reduce(f0.reshape(1), 1)[0]
            if settings.rise.rose(state, f0_value):
                return self.measured_step(state, closure, rng_at_start, loss, f0, gathered, rose=True)
        else:
            f0_value = float(f0)
        state.recent_losses = RiseCheck.remembered(state.recent_losses, f0_value)
        if state.probe is not None and state.probe.fresh is None:  # right after a lookahead step
            state.probe = self.noise.fresh_probe(state, gathered, gathered.grads(), self.measurer)
        self.inner_step(gathered)
        self.record_plain(state, f0_value)
        return loss

    def held_back(
        self, state: State, unit_groups: Sequence[int], proposals: list[Proposal], rose: bool
    ) -> tuple[list[Proposal], Deferred | None]:
        """Keep a rate increase from the plain steps until a lookahead step tests it.

        A lookahead step checks the rate it used (a spike is undone); the plain steps after it
        cannot be undone. A larger rate proposed there is first used by the next lookahead
        step, and the plain steps in between keep the rate just tested; a decrease applies at
        once. A plain step measured because its loss rose (``rose``) keeps no increase at all:
        a batch picked for its high loss has a steep line along which its own loss falls fast,
        so an increase read there is not evidence.
        """
        plain_steps_follow = (state.steps + 1) % self.settings.update_every and not self.settings.start.on_probation(
            state
        )
        if not (rose or plain_steps_follow):
            return proposals, None
        rates = state.rates.groups
        if all(p.alpha <= rates[g].adapted for g, p in zip(unit_groups, proposals)):
            return proposals, None
        held = [Proposal(min(p.alpha, rates[g].adapted), p.decision) for g, p in zip(unit_groups, proposals)]
        return held, None if rose else Deferred(tuple(unit_groups), tuple(p.alpha for p in proposals))


class Deferral:
    """The held-back rate increase in ``state_dict()["newt"]["deferred"]``."""

    fields = ("deferred",)

    @staticmethod
    def state_dict(state: State, *context: Any) -> dict[str, Any]:
        deferred = state.deferred
        return {"deferred": None if deferred is None else [list(deferred.groups), list(deferred.alphas)]}

    @staticmethod
    def load_state_dict(state: State, saved: Mapping[str, Any], *context: Any) -> None:
        deferred = saved.get("deferred")
        if deferred is None:
            state.deferred = None
            return
        groups = [checkpoint.count(g, "deferred.groups") for g in deferred[0]]
        alphas = checkpoint.numbers_list(deferred[1], "deferred.alphas", length=len(groups), low=0.0)
        if any(g >= len(state.rates.groups) for g in groups):
            raise checkpoint.CheckpointError(
                f"the checkpoint's newt.deferred names param groups {groups}, but it has "
                f"{len(state.rates.groups)}: load it into an optimizer over the same param groups."
            )
        state.deferred = Deferred(tuple(groups), tuple(alphas))


DEFERRAL = Deferral()

"""The mini-batch noise correction of the lookahead modes: the probe that measures the noise share.

A kept lookahead step leaves a probe behind (its same-batch slopes ``d0``, ``d1``, with
``theta_t`` still in the snapshot buffer); the next closure step's first call measures the
fresh batch's slope at the point the step ended on, before the buffer is overwritten; the next
lookahead step's reduction carries it, and the noise estimate (:mod:`newt._noise`) takes it in.
State: ``noise`` (the moving averages) and ``probe``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from newt import _checkpoint as checkpoint
from newt._noise import NoiseEstimate
from newt._state import NoiseProbe, State
from newt.pipeline.gather import Gathered
from newt.pipeline.measure import Measurer

__all__ = ["NoiseCorrection", "Restore"]

Restore = Callable[[Sequence[int], Sequence[torch.Tensor], str], list[torch.Tensor]]
"""``restore(indices, snapshot, what)``: load a checkpoint's snapshot of the parameters at
``indices`` into the buffer and return those parameters (``what`` names it in errors)."""


class NoiseCorrection:
    """Estimates the share of the lookahead's slopes that is mini-batch noise (at most ``cap``)."""

    fields = ("noise", "probe")

    def __init__(self, cap: float, per_group: bool) -> None:
        self.cap = cap
        self.per_group = per_group

    @property
    def active(self) -> bool:
        return self.cap > 0.0

    def keys(self, unit_groups: Sequence[int]) -> tuple[int, ...]:
        """The estimate's key per rate unit: the group, or -1 for the one global rate."""
        return tuple(unit_groups) if self.per_group else (-1,)

    def fresh_probe(self, state: State, gathered: Gathered, grads: list[torch.Tensor | None], measurer: Measurer):
        """Take the waiting probe out of ``state``, with its fresh-batch slope measured now.

        Call on a closure step after the first closure call (the gradients are this batch's, at
        the point the last step ended on) and before the snapshot buffer is overwritten.
        Returns the probe whose fresh slope still waits for a reduction, or None.
        """
        probe, state.probe = state.probe, None
        if probe is None or probe.fresh is not None:
            return probe
        active = gathered.active
        same = len(probe.params) == len(active) and all(p is q for p, q in zip(probe.params, active))
        if not (same and len(gathered.units) == len(probe.keys) and measurer.holds(gathered.local)):
            return None  # other parameters moved since: d_t is not snapshot - theta
        return replace(probe, fresh=measurer.dots(grads, gathered.local, gathered.units))

    @staticmethod
    def observed(state: State, probe: NoiseProbe, fresh: Sequence[float]) -> None:
        """Take the probe's reduced fresh slopes into the estimate."""
        noise = state.noise.copy()
        for key, d0, d1, slope in zip(probe.keys, probe.d0, probe.d1, fresh):
            noise.observe(key, d0, d1, slope)
        state.noise = noise

    @staticmethod
    def shares(state: State, keys: Sequence[int]) -> list[float]:
        return [state.noise.fraction(key) for key in keys]

    # ------------------------------------------------------------------ state_dict fragment

    def state_dict(self, state: State, params: Sequence[torch.Tensor], measurer: Measurer) -> dict[str, Any]:
        """``{"noise": {"averages": ..., "probe": ...}}``; a probe still waiting needs ``theta_t``."""
        probe = state.probe
        saved: dict[str, Any] | None = None
        if probe is not None:
            saved = {"keys": list(probe.keys), "d0": list(probe.d0), "d1": list(probe.d1)}
            if probe.fresh is not None:
                saved["fresh"] = probe.fresh
            else:
                index = {id(p): i for i, p in enumerate(params)}
                saved["indices"] = [index[id(p)] for p in probe.params]
                saved["snapshot"] = list(measurer.buffer)
        return {"noise": {"averages": state.noise.state_dict(), "probe": saved}}

    def load_state_dict(self, state: State, saved: Mapping[str, Any], restore: Restore) -> None:
        """Load the fragment; ``restore(indices, snapshot, what)`` loads a snapshot, returns the parameters."""
        noise_state = saved.get("noise", {})
        averages = [checkpoint.numbers_list(e, "noise.averages", length=3) for e in noise_state.get("averages", [])]
        state.noise = NoiseEstimate(self.cap)
        state.noise.load_state_dict(averages)
        state.probe = None
        probe = noise_state.get("probe")
        if probe is None:
            return
        keys = tuple(int(k) for k in checkpoint.numbers_list(probe["keys"], "noise.probe.keys", low=-1))
        d0 = tuple(checkpoint.numbers_list(probe["d0"], "noise.probe.d0", length=len(keys)))
        d1 = tuple(checkpoint.numbers_list(probe["d1"], "noise.probe.d1", length=len(keys)))
        if "fresh" in probe:
            fresh = checkpoint.tensor(probe["fresh"], "noise.probe.fresh", shape=(len(keys),))
            state.probe = NoiseProbe((), keys, d0, d1, fresh.clone())
            return
        params = restore(probe["indices"], probe["snapshot"], "noise measurement")
        state.probe = NoiseProbe(tuple(params), keys, d0, d1)

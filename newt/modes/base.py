"""What every mode shares: the settings it reads, the stop before the inner step, the records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from newt._numerics import Decision, Proposal
from newt._state import State
from newt.pipeline.decide import Checks, Measured, shrunk
from newt.pipeline.gather import Gathered
from newt.pipeline.measure import Measurer
from newt.pipeline.record import record, record_plain
from newt.policies import BlowUpCheck, RiseCheck, StartTest
from newt.strategies import Strategy

__all__ = ["Mode", "Settings"]


@dataclass(frozen=True)
class Settings:
    """What ``Newt``'s options say, resolved once at construction, for the modes to read."""

    strategy: Strategy
    checks: Checks
    start: StartTest
    rise: RiseCheck
    blow_up: BlowUpCheck
    noise_cap: float
    update_every: int
    per_group: bool
    scaler: torch.amp.GradScaler | None


class Mode:
    """A way of feeding the step: what it measures, in which order, and which policies it runs.

    Attributes:
        name: The mode's name in ``newt.modes.MODES`` and the docs.
        policies: Each option of :class:`newt.Policies` that acts in this mode, with when it acts.
    """

    name: ClassVar[str]
    policies: ClassVar[Mapping[str, str]]

    def __init__(self, inner: torch.optim.Optimizer, settings: Settings, measurer: Measurer) -> None:
        self.inner = inner
        self.settings = settings
        self.measurer = measurer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def step(self, state: State, closure_or_loss: Any) -> Any:  # pragma: no cover - every mode overrides it
        raise NotImplementedError

    def stops_before_step(self, state: State, f0: torch.Tensor | None, gathered: Gathered) -> bool:
        """Unscale the gradients (with a GradScaler) and check ``theta_t``'s numbers.

        Returns True when the step stopped here, before the inner step, with ``state.info`` set.
        """
        scaler, measurer = self.settings.scaler, self.measurer
        if scaler is not None:
            scaler.unscale_(self.inner)  # once per step: the scaler allows no more
            if not measurer.finite(None, gathered.grads()):
                # An fp16 overflow: the scaler backs off in its update(); the rate is not at fault.
                groups = state.rates.groups
                kept = [Proposal(groups[g].adapted, Decision.NONFINITE) for g in gathered.unit_groups]
                self.record_stop(state, f0, gathered, kept)
                return True
        if self.settings.checks.nonfinite.reject and not measurer.finite(f0, gathered.grads()):
            # Nothing has moved yet: skipping the inner step keeps its state clean too.
            self.record_stop(state, f0, gathered, self.shrunk(state, gathered.unit_groups, Decision.NONFINITE))
            return True
        return False

    def record_stop(self, state: State, f0: torch.Tensor | None, gathered: Gathered, proposals: list[Proposal]) -> None:
        nans = [math.nan] * len(gathered.unit_groups)
        f0_value = math.nan if f0 is None else float(f0)
        self.record(state, Measured(f0_value, math.nan, nans, nans), gathered.unit_groups, proposals, rejected=True)

    def shrunk(self, state: State, unit_groups: Sequence[int], decision: Decision) -> list[Proposal]:
        """Every unit's adapted rate cut by ``shrink`` (a fault, a spike, a failed start)."""
        groups = state.rates.groups
        return shrunk([groups[g] for g in unit_groups], self.settings.checks.options, decision)

    def record(
        self,
        state: State,
        measured: Measured,
        unit_groups: Sequence[int],
        proposals: Sequence[Proposal],
        *,
        rejected: bool,
        noise: Sequence[float] | None = None,
    ) -> None:
        record(
            state,
            self.param_groups,
            self.settings.per_group,
            measured,
            unit_groups,
            proposals,
            rejected=rejected,
            noise=noise,
        )

    def record_plain(self, state: State, f0: float) -> None:
        record_plain(state, self.param_groups, self.settings.per_group, self.settings.update_every, f0)

    def inner_step(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Snapshot ``theta_t`` and run the inner step; on any exception restore ``theta_t``."""
        snapshot = self.measurer.snapshot(local)
        try:
            self.inner.step()
        except BaseException:
            self.measurer.restore(local)
            raise
        return snapshot

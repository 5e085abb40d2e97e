"""What every mode shares: the settings it reads, the stop before the inner step, the records."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from newt._isolation import BufferRecord, recorded_module_buffers
from newt._numerics import Decision, Proposal
from newt._state import State
from newt.options import Policies, RuleOptions, check_option
from newt.pipeline.decide import Checks, Measured, shrunk
from newt.pipeline.gather import Gathered, first_call
from newt.pipeline.measure import Measurer
from newt.pipeline.record import record, record_plain
from newt.policies import AscentHold, BlowUpCheck, NonfiniteCheck, RiseCheck, SpikeTest, StartTest
from newt.strategies import Strategy, measured_forward_only, resolve

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
    policies: Policies
    max_grad_norm: float | None = None

    @classmethod
    def build(
        cls,
        strategy: str | Callable[..., Any],
        options: RuleOptions,
        policies: Policies,
        update_every: object,
        per_group: object,
        grad_scaler: object,
        max_grad_norm: object = None,
        forward_only: object = None,
    ) -> Settings:
        """The options resolved once: the strategy's rules, the policy objects, the step's structure.

        Raises:
            ValueError: ``per_group=True`` with a strategy that needs the loss values,
                ``forward_only=True`` with one that reads the lookahead's gradient (or with
                ``per_group=True``), or an option out of range.
            TypeError: ``grad_scaler`` is not a GradScaler, or an option has the wrong type.
        """
        resolved = resolve(strategy)
        update_every = check_option("update_every", update_every)
        per_group = check_option("per_group", per_group)
        if forward_only is not None:
            forward_only = check_option("forward_only", forward_only)
        resolved = measured_forward_only(resolved, per_group, forward_only)
        if per_group and resolved.without_losses is None:
            raise ValueError(
                f"per_group=True adapts each group from its own slopes d0, d1, which strategy "
                f"{resolved.name!r} cannot do (the loss values belong to all groups at once): "
                "use strategy='retsinas' or strategy='gen', or per_group=False."
            )
        if grad_scaler is not None and not all(hasattr(grad_scaler, m) for m in ("unscale_", "get_scale", "update")):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}: "
                "build one with torch.amp.GradScaler(device) and pass it here."
            )
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        clip = None if max_grad_norm is None else check_option("max_grad_norm", max_grad_norm)
        p = policies
        checks = Checks(
            options,
            NonfiniteCheck(p.reject_nonfinite),
            SpikeTest(p.spike_threshold, p.reject_spikes),
            AscentHold(p.hold_on_ascent),
            p.start_armijo,
            scaler is not None,
        )
        tests = StartTest(p.start_armijo), RiseCheck(p.rise_threshold), BlowUpCheck(p.blow_up_threshold)
        return cls(resolved, checks, *tests, p.noise_correction, update_every, per_group, scaler, p, clip)


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

    def first_call(self, closure: Callable[[], Any]) -> tuple[Any, torch.Tensor, BufferRecord | None]:
        """The closure at ``theta_t``: its return value, the loss, and (when non-finite steps are
        rejected) the module buffers as they were before it, to put back if the step is."""
        with torch.enable_grad():
            if not self.settings.checks.nonfinite.reject:
                return (*first_call(closure), None)
            with recorded_module_buffers() as record:
                loss, f0 = first_call(closure)
        return loss, f0, record

    def stops_before_step(
        self, state: State, f0: torch.Tensor | None, gathered: Gathered, buffers: BufferRecord | None = None
    ) -> bool:
        """Unscale the gradients (with a GradScaler) and check ``theta_t``'s numbers.

        Returns True when the step stopped here, before the inner step, with ``state.info`` set.
        A step stopped for a non-finite loss or gradient also puts back ``buffers`` (BatchNorm's
        statistics of a batch that went wrong).
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
            if buffers is not None:
                buffers.restore()
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

    def clipped(self, gathered: Gathered) -> torch.Tensor | None:
        """Clip the gradients the inner step is about to use to ``max_grad_norm`` (as
        ``torch.nn.utils.clip_grad_norm_`` does), and return the factor they were scaled by, so
        that a slope measured with them can be divided back to the unclipped gradient's."""
        max_norm = self.settings.max_grad_norm
        if max_norm is None:
            return None
        total = torch.nn.utils.clip_grad_norm_(gathered.active, max_norm, foreach=self.measurer.foreach)
        if hasattr(total, "full_tensor"):  # DTensor gradients (FSDP2): the norm of the whole
            total = total.full_tensor()
        return (max_norm / (total.to(torch.float64) + 1e-6)).clamp(max=1.0)

    def inner_step(self, gathered: Gathered) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Snapshot ``theta_t``, clip (with ``max_grad_norm``) and run the inner step; on any
        exception restore ``theta_t``. Returns the snapshot and the clipping factor."""
        local = gathered.local
        snapshot = self.measurer.snapshot(local)
        try:
            clip = self.clipped(gathered)
            self.inner.step()
        except BaseException:
            self.measurer.restore(local)
            raise
        return snapshot, clip

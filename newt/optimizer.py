"""``Newt``: a ``torch.optim.Optimizer`` that adapts the learning rate of any inner optimizer."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from newt import _kernels
from newt._isolation import RngState, cuda_devices, frozen_module_buffers, replayed_rng
from newt._noise import NoiseEstimate, debiased
from newt._numerics import all_finite, check_real, clamp_alpha
from newt._rates import Rates
from newt.distributed import agree_all, agree_any, local_tensor, reduce_measurements, sharded
from newt.rules import (
    DEFAULT_OPTIONS,
    LOSS_FREE_STRATEGIES,
    SLOPE_FORMS,
    STRATEGIES,
    Decision,
    Proposal,
    Rule,
    RuleOptions,
    blew_up,
    gen_slopes,
    grown_rate,
    guard_custom_rule,
    held_on_ascent,
    next_batch_verdict,
    rose_sharply,
    scheduled_proposal,
    shrunk_rate,
    spike_guard,
    sufficient_decrease,
)

Closure = Callable[[], torch.Tensor | float]

__all__ = ["GroupStepInfo", "Newt", "StepInfo"]

BUILTIN_RULES = (*STRATEGIES.values(), gen_slopes)

AUTO = "auto"
"""The default strategy: ``gen`` with a closure (lookahead and lazy modes), and closure-free
given the loss (``step(loss=...)`` or :meth:`Newt.give_loss`) with the blow-up check on (there
``gen``'s slope form, :func:`newt.rules.gen_slopes`); ``retsinas`` closure-free without the
loss, and with ``per_group=True`` and a closure (no per-group loss values). Around Adam, ``gen``
had the best worst start of the three rules on every benchmark task, with a closure and given
the loss; with no loss to check, ``gen``'s smoothing lets the rate fall by at most a tenth per
step, with nothing to undo an overshoot, and it was the least robust row (docs/benchmarks.md)."""

RISE_WINDOW = 8
"""How many recent batch losses (one per closure step) a plain step's loss is compared with."""


@dataclass(frozen=True)
class GroupStepInfo:
    """What one step measured and decided for one param group (``per_group=True`` only).

    Attributes:
        index: The param group's index in ``param_groups``.
        d0: ``<grad L(theta_t), d_t>`` over the group's parameters.
        d1: ``<grad L(theta_{t+1}), d_t>`` over the group's parameters.
        alpha: The group's rate for the step.
        alpha_next: The group's rate for the next step.
        decision: Why the group's rule chose ``alpha_next``.
        noise: The share of ``d0`` removed from the slopes as mini-batch noise before the rule.
    """

    index: int
    d0: float
    d1: float
    alpha: float
    alpha_next: float
    decision: Decision
    noise: float = 0.0


@dataclass(frozen=True)
class StepInfo:
    """What one ``Newt.step`` measured and decided, for logging.

    Attributes:
        f0: Loss at the start of the step, ``L(theta_t)`` (NaN in closure-free mode).
        f1: Loss at the lookahead point ``theta_{t+1}``, same batch (NaN when not measured).
        d0: ``<grad L(theta_t), d_t>`` with the step ``d_t = theta_t - theta_{t+1}``. In
            closure-free mode, the sum over the block of steps that was just evaluated.
        d1: ``<grad L(theta_{t+1}), d_t>`` (closure-free mode: with the next batch's gradient).
        alpha: The rate the step used (the largest group's learning rate). In closure-free
            mode: the rate of the steps just measured (the previous step, or block).
        alpha_next: The rate the next step will use. In closure-free mode the rate is adapted
            at the start of ``step()``, so this step's own inner step already used it. With lazy
            updates a larger rate is held back for the plain steps (see ``update_every``).
        decision: Why the rule chose ``alpha_next`` (a :class:`newt.Decision`, a ``str``);
            ``"plain"`` when the step did not adapt the rate (lazy updates, closure-free blocks).
        rejected: True when the step was undone: the parameters are back at ``theta_t`` (see
            ``reject_spikes`` and ``reject_nonfinite``). When the step was rejected before the
            inner step ran (a non-finite loss or gradient at ``theta_t``), ``f1``, ``d0`` and
            ``d1`` are NaN: they were never measured.
        groups: With ``per_group=True``, one :class:`GroupStepInfo` per adapted group; else None.
        noise: The share of ``d0`` that the rule saw removed from the slopes as mini-batch noise
            (see ``noise_correction``); ``f1``, ``d0`` and ``d1`` above are the raw measurements.
    """

    f0: float
    f1: float
    d0: float
    d1: float
    alpha: float
    alpha_next: float
    decision: Decision
    rejected: bool = False
    groups: tuple[GroupStepInfo, ...] | None = None
    noise: float = 0.0


@dataclass
class _Pending:
    """Closure-free mode: the last step's ``<g, d>``, waiting for the next step's gradient.

    The snapshot buffer holds ``theta_{t-1}`` meanwhile, so ``d_{t-1} = snapshot - theta_t``.
    """

    indices: tuple[int, ...]  # which parameters (flat positions across the groups) moved
    d0: torch.Tensor  # one entry per rate unit (one, or one per group)
    block_d0: torch.Tensor | None = None  # sums over the current block of update_every steps
    block_d1: torch.Tensor | None = None
    count: int = 0
    loss: float | None = None  # L_{t-1}(theta_{t-1}), given as step(loss=...), reduced across ranks


@dataclass
class _NoiseProbe:
    """A kept lookahead step's same-batch slopes, waiting for a fresh batch's gradient at its end.

    The snapshot buffer holds ``theta_t`` meanwhile, so ``d_t = snapshot - theta_{t+1}``. Once
    the next closure step has computed ``<grad L_fresh(theta_{t+1}), d_t>`` (``fresh``, still on
    the device and not reduced across ranks), the next lookahead step's reduction carries it.
    """

    params: list[torch.Tensor]  # the parameters the step moved, in order
    keys: list[int]  # the noise estimate's key per rate unit: the group, or -1 (global rate)
    d0: list[float]
    d1: list[float]
    fresh: torch.Tensor | None = None


class Newt(torch.optim.Optimizer):
    """Adapt the learning rate of any inner optimizer with a Newton-like rule.

    Each ``step(closure)`` evaluates the closure at ``theta_t``, lets the inner optimizer take
    one step with the current rate (landing on the lookahead point ``theta_{t+1}``), evaluates
    the closure again there on the same batch, and feeds the four measured numbers (see
    :class:`StepInfo`) to the update rule. Afterwards every param group's ``"lr"`` holds the
    rate the next step will use. ``step()`` without a closure, after your own ``backward()``, is
    the closure-free mode: the next step's gradient stands in for the lookahead's (``retsinas``
    and ``gen`` only).

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so schedulers,
    loggers and checkpoints see the usual structure.

    Args:
        inner: The optimizer whose steps are taken, e.g. ``torch.optim.Adam(model.parameters(),
            lr=1e-3)``. Its learning rates are the initial rates.
        strategy: ``"auto"`` (the default: ``"gen"`` with a closure or, closure-free, given the
            loss; ``"retsinas"`` closure-free without the loss, or with ``per_group=True`` and a
            closure; see :data:`newt.optimizer.AUTO`), ``"gen"``,
            ``"taylor"``, ``"retsinas"`` (see :mod:`newt.rules`), or a callable with the same
            signature as those rules.
        gamma: Newton damping of ``retsinas`` and ``taylor``, in (0, 1].
        smoothing: Moving-average coefficient of ``gen``, in [0, 1).
        alpha_min: Smallest rate, > 0.
        alpha_max: Largest rate, > ``alpha_min``.
        max_factor: Each update changes the rate by a factor in ``[1/max_factor, max_factor]``.
        eps: Relative guard of the rules' divisions, >= 0.
        shrink: Factor in (0, 1) applied to the rate when a measured number is NaN or
            infinite, or after a loss spike.
        spike_threshold: A step is a loss spike when the lookahead loss exceeds the starting
            loss by more than ``spike_threshold * |f0|`` (default 0.2: the loss grew by a fifth
            on the same batch); the rate then shrinks by ``shrink`` whatever the strategy says.
            In (0, inf]; ``math.inf`` turns the policy off.
        reject_spikes: Undo a loss-spike step: put the parameters back at ``theta_t`` (bit for
            bit, from the snapshot buffer), so the next step retries from there with the
            smaller rate.
        blow_up_threshold: Closure-free mode given the loss (``step(loss=...)``), after the
            start-up test: a step after which the next batch's loss exceeds the first loss
            read (the untrained model's) by more than ``blow_up_threshold`` times its size
            (default 0.5: more than 1.5 times it) blew up; it is treated as a loss spike (the
            rate shrinks; undone if ``reject_spikes``). Batch losses late in training vary too
            much for the spike threshold, but a healthy run does not climb back above where
            it started (see :func:`newt.rules.blew_up`). In (0, inf]; ``math.inf`` turns it
            off.
        rise_threshold: Lazy mode (a closure, ``update_every > 1``): a plain step whose loss
            at ``theta_t`` exceeds the largest of the last 8 closure steps' losses by more
            than ``rise_threshold`` times its size (default 3: more than four times it) is
            taken as a lookahead step instead, one more closure call that measures the step,
            adapts the rate and can undo the step as a spike. The plain steps run at the rate
            the last lookahead step tested, unmeasured; an instability that builds up over a
            few of them (Adam late in training, at a rate that has grown) shows as such a rise
            before the next scheduled lookahead step would see it (see
            :func:`newt.rules.rose_sharply`). Each plain step saves the random state and reads
            its loss before the inner step (on a GPU that read waits for the backward pass):
            2-3 % of a lazy step of a small MLP on the CPU (docs/benchmarks.md). Under
            ``torch.distributed`` the ranks average the loss (one small ``all_reduce`` per
            plain step). In (0, inf]; ``math.inf`` turns it off.
        start_armijo: The initial rate is the caller's guess, so it is on probation: until one
            step's loss falls by at least ``start_armijo`` times the decrease its slope
            predicts (``f0 - f1 >= start_armijo * D0`` on the same batch, Armijo's
            sufficient-decrease condition), a step that falls short is undone and the rate
            shrinks by ``shrink`` (decision ``"insufficient"``). Afterwards only loss spikes
            undo steps. This catches a far-too-large start whose loss still went down (a
            transformer's first Adam steps at 0.1), which damages the model without a spike.
            In [0, 1); 0 turns the check off. Closure-free mode measures no loss: there the
            test runs only on the losses given as ``step(loss=...)``, and compares consecutive
            batches (see :meth:`step`).
        hold_on_ascent: In lookahead mode (a closure, ``update_every=1``), keep the rate after a
            step whose direction rose on its own batch (``D0 < 0``: the inner optimizer's
            momentum or preconditioner disagreed with the batch's gradient), where every rule
            would lower it (the Newton rules by ``max_factor``): that says the direction was
            wrong, not the step's size, and runs of such steps collapsed the rate (decision
            ``"ascent"``; see :func:`newt.rules.held_on_ascent`). A loss spike still shrinks
            it. Built-in strategies only; lazy and closure-free modes always follow the rule.
        reject_nonfinite: Undo a step whose loss or gradients are NaN or infinite, so no
            non-finite number reaches the parameters. A non-finite loss or gradient at
            ``theta_t`` is caught before the inner step (which then does not run, so its state
            is untouched); one at the lookahead point undoes the inner step's move. This costs
            one extra host synchronisation per step, before the inner step.
        update_every: Adapt the rate every ``update_every`` steps only (lazy updates). With a
            closure, the other steps are plain inner steps with a single closure call (cost
            ``1 + 1/update_every`` passes per step); a rate increase is first used by the next
            lookahead step, which can undo it, and the plain steps before it keep the rate
            just tested. Until the initial rate has passed the start-up test (``start_armijo``)
            every step is a lookahead step, and so is a plain step whose loss rose sharply
            (``rise_threshold``). Without a closure, the rate is adapted from
            the sums of the measurements over each block of ``update_every`` steps, which
            averages out mini-batch noise (Retsinas et al.).
        per_group: Adapt each param group's rate from its own ``d0``/``d1`` sums, instead of one
            global rate that keeps the groups' ratios. Needs a rule that does not use loss
            values: ``"retsinas"`` or ``"gen"`` (which then fits its parabola to the slopes).
        grad_scaler: The ``torch.amp.GradScaler`` of an fp16 training loop, whose own ``step``
            refuses closures. The closure backpropagates ``scaler.scale(loss)`` and returns the
            unscaled loss; Newt unscales the gradients (``scaler.unscale_``) before the inner
            step, skips the step on an overflow (keeping the rate: that is the scaler's
            business), and divides the lookahead's measurement by the scale. Call
            ``scaler.update()`` after ``opt.step(closure)``, as usual; never ``scaler.step``.
        process_group: The ``torch.distributed`` group whose ranks must agree on the rate
            (default: the whole world, when a process group is initialised). The losses are
            averaged across ranks and the dot products averaged (DDP) or summed (sharded FSDP2
            parameters), in one ``all_reduce`` per step (see :mod:`newt.distributed`).
        noise_correction: The largest share of the lookahead's slopes that may be removed as
            mini-batch noise, in [0, 1]; 0 turns the correction off. The lookahead measures on
            the batch the step was fitted to, so its slopes overstate the expected loss's and
            the rules would aim too far; the next batch's gradient at the same point measures
            by how much (one more dot product per step), and a moving average of that share,
            capped here, is subtracted before the rule (see :mod:`newt._noise`). On a
            deterministic (full-batch) problem the share is exactly 0. Lookahead and lazy
            modes; closure-free mode already measures on fresh batches.
        foreach: Use the multi-tensor ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    A rejected step still advanced the inner optimizer's state (moments, step count) by one step
    with the finite gradient of ``theta_t``, as if the step had been taken with a very small
    rate; it is counted in ``StepInfo.rejected`` and in ``state_dict()["newt"]["rejected"]``.

    With several param groups and ``per_group=False``, one global rate keeps the ratios between
    the groups' learning rates: the rule adapts the largest one and every group is scaled by the
    same factor. A change to ``group["lr"]`` between steps (an ``lr_scheduler``) is read as a
    multiplier on the adapted rate (see docs/schedulers.md).

    Raises:
        TypeError: ``inner`` is not a ``torch.optim.Optimizer``, or an option has the wrong type.
        ValueError: An option is out of range, the strategy is unknown, a param group has no
            usable ``"lr"``, or the inner optimizer is ``differentiable``.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        strategy: str | Callable[..., Any] = AUTO,
        *,
        gamma: float = DEFAULT_OPTIONS.gamma,
        smoothing: float = DEFAULT_OPTIONS.smoothing,
        alpha_min: float = DEFAULT_OPTIONS.alpha_min,
        alpha_max: float = DEFAULT_OPTIONS.alpha_max,
        max_factor: float = DEFAULT_OPTIONS.max_factor,
        eps: float = DEFAULT_OPTIONS.eps,
        shrink: float = DEFAULT_OPTIONS.shrink,
        spike_threshold: float = 0.2,
        reject_spikes: bool = True,
        blow_up_threshold: float = 0.5,
        rise_threshold: float = 3.0,
        start_armijo: float = 0.1,
        hold_on_ascent: bool = True,
        reject_nonfinite: bool = False,
        update_every: int = 1,
        per_group: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        noise_correction: float = 0.5,
        foreach: bool = True,
    ) -> None:
        _check_inner(inner)
        self.options = RuleOptions(
            gamma=gamma,
            smoothing=smoothing,
            alpha_min=alpha_min,
            alpha_max=alpha_max,
            max_factor=max_factor,
            eps=eps,
            shrink=shrink,
        )
        self.strategy = strategy
        self._rule = _resolve_strategy(strategy)
        self._loss_free_rule = None  # closure-free mode and per-group rates need one
        if isinstance(strategy, str):
            self._loss_free_rule = LOSS_FREE_STRATEGIES.get("retsinas" if strategy == AUTO else strategy)
        # closure-free steps whose given loss is checked for a blow-up (see AUTO)
        self._checked_free_rule = gen_slopes if strategy == AUTO else self._loss_free_rule
        self.spike_threshold = _check_threshold(
            "spike_threshold", spike_threshold, "the relative loss rise that counts as a spike, e.g. 0.2"
        )
        self.reject_spikes = _check_flag("reject_spikes", reject_spikes)
        self.blow_up_threshold = _check_threshold(
            "blow_up_threshold", blow_up_threshold, "the rise above the first loss counted as a blow-up, e.g. 0.5"
        )
        self.rise_threshold = _check_threshold(
            "rise_threshold",
            rise_threshold,
            "the rise above the largest recent loss that makes a plain step a lookahead step, e.g. 3",
        )
        self._recent_losses: list[float] = []  # the last RISE_WINDOW closure steps' losses at theta_t
        self.start_armijo = check_real(
            "start_armijo",
            start_armijo,
            low=0,
            high=1,
            low_open=False,
            high_open=True,
            hint="start_armijo is the share of the predicted decrease a first step must achieve, e.g. 0.1 (0: off).",
        )
        self.hold_on_ascent = _check_flag("hold_on_ascent", hold_on_ascent)
        self.reject_nonfinite = _check_flag("reject_nonfinite", reject_nonfinite)
        if isinstance(update_every, bool) or not isinstance(update_every, numbers.Integral) or update_every < 1:
            wrong_type = isinstance(update_every, bool) or not isinstance(update_every, numbers.Integral)
            raise (TypeError if wrong_type else ValueError)(
                f"update_every must be an integer >= 1, got {update_every!r}: 1 adapts the rate every "
                "step, e.g. 4 adapts it every fourth step."
            )
        self.update_every = int(update_every)
        self.per_group = _check_flag("per_group", per_group)
        if self.per_group and self._loss_free_rule is None:
            raise ValueError(
                f"per_group=True adapts each group from its own slopes d0, d1, which strategy "
                f"{self._strategy_name()!r} cannot do (the loss values belong to all groups at once): "
                "use strategy='retsinas' or strategy='gen', or per_group=False."
            )
        if grad_scaler is not None and not all(hasattr(grad_scaler, m) for m in ("unscale_", "get_scale", "update")):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}: "
                "build one with torch.amp.GradScaler(device) and pass it here."
            )
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.process_group = process_group
        self.noise_correction = check_real(
            "noise_correction",
            noise_correction,
            low=0,
            high=1,
            low_open=False,
            high_open=False,
            hint="noise_correction caps the share of the slopes removed as mini-batch noise: 0 is off, e.g. 0.5.",
        )
        self.foreach = _check_flag("foreach", foreach)
        # Optimizer.__init__ sets up the hook registries; it builds throwaway groups that are
        # replaced right after by the inner optimizer's own list (see add_param_group).
        super().__init__([{"params": list(g["params"])} for g in inner.param_groups], defaults={})
        self.inner = inner
        self.defaults = inner.defaults
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.step_info: StepInfo | None = None
        """The measurements and decision of the latest step (None before the first)."""
        self._steps = 0
        self._rejected = 0
        # Whether a step has passed the start_armijo test: until then the rate is on probation.
        self._start_proven = False
        self._rates = Rates()
        self._rates.sync(self.param_groups)
        self._sharded = sharded(self._params())  # DTensor shards: dot products are partial sums
        self._snapshot: list[torch.Tensor] | None = None
        self._pending: _Pending | None = None
        self._noise = NoiseEstimate(self.noise_correction)
        self._probe: _NoiseProbe | None = None
        # Lazy updates: a rate increase held back from the plain steps until the next lookahead
        # step, as (unit groups, adapted rates).
        self._deferred: tuple[list[int], list[float]] | None = None
        # A loss given with give_loss(), waiting for the next closure-free step.
        self._given_loss: torch.Tensor | float | None = None
        # Closure-free mode given the loss: the first loss read (the untrained model's, reduced
        # across ranks), against which later losses are checked for a blow-up.
        self._loss_reference: float | None = None

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | float | None:
        """Take one inner step and adapt the learning rate.

        Args:
            closure: Clears the gradients, computes the loss on the current batch, calls
                ``backward()`` and returns the loss. It is called twice per step: at
                ``theta_t`` and at the lookahead point, with the same random state, and with
                module buffers (BatchNorm statistics) restored after the second call (once on
                the steps that ``update_every`` leaves plain, unless the loss rose sharply:
                see ``rise_threshold``). Without a closure (after your own
                ``backward()``), the step is closure-free: see the class docstring.
            loss: Closure-free mode only: the loss whose ``backward()`` filled the gradients
                (this batch's, at ``theta_t``). It gives the closure-free step the start-up
                test that a closure gives the others (see ``start_armijo``), on the next
                batch's loss, with the spike threshold as the tolerance for the difference
                between batches (:func:`newt.rules.next_batch_verdict`): until a step's loss
                has fallen by the Armijo share, a step after which the next batch's loss rose
                by more than ``spike_threshold``, or fell short of the Armijo share by more
                than that, is undone and the rate shrinks (while the start is on probation,
                reading the loss costs one host synchronisation per step). Batch losses vary
                too much between batches to judge later steps by the last one; after the
                start, a step is undone only when the loss blew up, above the first loss read
                by ``blow_up_threshold`` (read with the measurements, at no extra cost).
                Optional; a loop that calls ``step()`` bare can give it beforehand with
                :meth:`give_loss`.

        Returns:
            The loss the first closure call returned (at ``theta_t``); None without a closure.

        After the step the parameters' ``.grad`` hold the gradients of the lookahead point (of
        ``theta_t`` when ``reject_nonfinite`` stopped the step before the inner step, on plain
        steps, and in closure-free mode). A rejected step (``step_info.rejected``) leaves the
        parameters at ``theta_t``. If the closure, the inner step or the rule raises, the
        parameters are restored to ``theta_t`` and the exception propagates unchanged; the next
        ``step`` works as usual.
        """
        given, self._given_loss = self._given_loss, None
        if given is not None:
            if loss is not None:
                raise ValueError(
                    "Newt.step got loss= while a loss given with give_loss() was waiting for it: give the "
                    "loss one way only, either opt.give_loss(loss) before opt.step(), or opt.step(loss=loss)."
                )
            loss = given
        if closure is not None and loss is not None:
            source = "a loss from give_loss()" if given is not None else "loss="
            raise ValueError(
                f"Newt.step got both a closure and {source}: with a closure Newt measures the loss itself. "
                "Give the loss only to a closure-free step (after your own backward())."
            )
        self._rates.sync(self.param_groups)
        if closure is None:
            self._probe = None  # the closure-free step reuses the snapshot buffer
            return self._closure_free_step(loss)
        self._pending = None  # a closure step ends any closure-free measurement in progress
        closure = torch.enable_grad()(closure)
        if self._steps % self.update_every and not self._on_probation():
            return self._plain_step(closure)
        return self._lookahead_step(closure)

    def give_loss(self, loss: torch.Tensor | float) -> None:
        """Give the next closure-free ``step()`` its loss, for loops that call ``step()`` bare.

        ``opt.give_loss(loss); opt.step()`` is ``opt.step(loss=loss)`` (see :meth:`step`: the
        loss lets closure-free mode test the initial rate), for training loops that call
        ``optimizer.step()`` themselves, such as the Hugging Face ``Trainer``
        (:class:`newt.integrations.huggingface.NewtTrainer` gives it the loss this way). A
        later call before the step replaces the loss (after a step that a ``GradScaler``
        skipped, the next window's loss replaces the stale one); the step uses it once.

        Args:
            loss: The loss whose ``backward()`` filled the gradients the next step uses, a
                scalar tensor (detached here; reading it waits for the step) or a number. With
                gradient accumulation, the sum of the micro-batches' losses as each was scaled
                for its ``backward()``.

        Raises:
            TypeError: ``loss`` is not a scalar tensor or a real number. The next ``step()``
                raises ``ValueError`` if it gets a closure or ``loss=`` as well.
        """
        loss = _checked_loss(loss, "give_loss()")
        self._given_loss = loss.detach() if isinstance(loss, torch.Tensor) else loss

    def _on_probation(self) -> bool:
        """The initial rate has not passed the start-up Armijo test yet (see ``start_armijo``).

        Lazy updates take only lookahead steps until then: a plain step would run at a rate
        that nothing has tested, and could not be undone.
        """
        return self.start_armijo > 0.0 and not self._start_proven

    def _lookahead_step(self, closure: Callable[[], Any]) -> Any:
        params = self._params()
        rng_at_start = RngState(cuda_devices(params))
        loss, f0, active = self._first_call(closure, params)
        units, unit_groups = self._units(active)
        if self._stopped_before_step(f0, active, unit_groups):
            return loss
        return self._lookahead_rest(closure, rng_at_start, loss, f0, active, units, unit_groups)

    def _lookahead_rest(
        self,
        closure: Callable[[], Any],
        rng_at_start: RngState,
        loss: Any,
        f0: torch.Tensor,
        active: list[torch.Tensor],
        units: list[list[int]],
        unit_groups: list[int],
        *,
        rose: bool = False,
    ) -> Any:
        """A lookahead step from its first closure call on: the inner step, the lookahead, the rule.

        ``rose``: a plain step measured because its loss rose sharply (see ``rise_threshold``).
        """
        local = _locals(active)  # DTensor parameters (FSDP2): this rank's shards
        grads = _locals([p.grad for p in active])
        probe = self._measure_fresh_slope(active, local, grads, units)
        snapshot = self._snapshot_of(local)
        try:
            self.inner.step()
            d0 = self._dots(grads, snapshot, local, units)
            del grads
            for p in active:  # the lookahead's gradient must not accumulate onto the first one
                p.grad = None
            with replayed_rng(rng_at_start), frozen_module_buffers():
                f1 = _loss_tensor(closure(), "second (lookahead)")
            grads = _locals([p.grad for p in active])
            if all(g is None for g in grads):
                raise RuntimeError(
                    "the lookahead closure call produced no gradient: the closure must call "
                    "loss.backward() every time it is called."
                )
            d1 = self._dots(grads, snapshot, local, units)
            if self.grad_scaler is not None:  # the lookahead's gradients are still scaled
                d1 = d1 / self.grad_scaler.get_scale()
            device = d1.device
            parts = [torch.stack([f0.to(device), f1.to(device)]), d0.to(device), d1]
            if probe is not None:  # the previous step's fresh-batch slope rides along
                parts.append(probe.fresh.to(device))
            values = torch.cat(parts)
            values = reduce_measurements(values, 2, is_sharded=self._sharded, group=self.process_group).tolist()
            n = len(units)
            f0_value, f1_value, d0s, d1s = values[0], values[1], values[2 : 2 + n], values[2 + n : 2 + 2 * n]
            self._remember_loss(f0_value)
            if probe is not None:
                for key, d0_, d1_, fresh in zip(probe.keys, probe.d0, probe.d1, values[2 + 2 * n :]):
                    self._noise.observe(key, d0_, d1_, fresh)
            keys = self._noise_keys(unit_groups)
            noise = [self._noise.fraction(key) for key in keys]
            proposals, rejected = self._adapt(
                f0_value, f1_value, d0s, d1s, unit_groups, _split(grads, units), noise=noise, loss_eps=_loss_eps(loss)
            )
        except BaseException:
            _kernels.copy_(local, snapshot, foreach=self.foreach)
            raise
        if rejected:
            _kernels.copy_(local, snapshot, foreach=self.foreach)
        elif self.noise_correction > 0.0:  # theta_{t+1} stays: a fresh batch can measure there
            self._probe = _NoiseProbe(active, keys, d0s, d1s)
        deferred = None
        if rose:
            # A batch picked for its high loss has a steep line along which its own loss falls
            # fast: an increase read there is not evidence (MNIST-1D: 12 of 16 runs whose
            # measured steps could raise the rate ended higher). It may lower the rate or undo
            # the step; a held-back increase is dropped too.
            proposals, _ = self._hold_growth(unit_groups, proposals)
        elif (self._steps + 1) % self.update_every and not self._on_probation():  # plain steps follow
            proposals, deferred = self._hold_growth(unit_groups, proposals)
        self._finish(f0_value, f1_value, d0s, d1s, unit_groups, proposals, rejected=rejected, noise=noise)
        self._deferred = deferred
        return loss

    def _plain_step(self, closure: Callable[[], Any]) -> Any:
        """A step that does not adapt the rate (lazy updates): one closure call, one inner step."""
        params = self._params()
        watching = math.isfinite(self.rise_threshold)
        # the RNG state a lookahead would replay, in case this step turns into one
        rng_at_start = RngState(cuda_devices(params)) if watching else None
        loss, f0, active = self._first_call(closure, params)
        units, unit_groups = self._units(active)
        if self._stopped_before_step(f0, active, unit_groups):
            return loss
        if watching:
            # every rank must take the same branch: the decision reads the batch's mean loss
            f0_value = reduce_measurements(
                f0.detach().to(torch.float64).reshape(1), 1, is_sharded=self._sharded, group=self.process_group
            ).item()
            if rose_sharply(self._recent_losses, f0_value, self.rise_threshold):
                return self._lookahead_rest(closure, rng_at_start, loss, f0, active, units, unit_groups, rose=True)
        else:
            f0_value = float(f0)
        self._remember_loss(f0_value)
        if self._probe is not None and self._probe.fresh is None:  # right after a lookahead step
            grads = _locals([p.grad for p in active])
            self._probe = self._measure_fresh_slope(active, _locals(active), grads, units)
        self._guarded_inner_step(active)
        self._finish_plain(f0_value)
        return loss

    def _hold_growth(
        self, unit_groups: list[int], proposals: list[Proposal]
    ) -> tuple[list[Proposal], tuple[list[int], list[float]] | None]:
        """Lazy updates: keep a rate increase from the plain steps until a lookahead step tests it.

        A lookahead step checks the rate it used (a spike is undone); the plain steps after it
        cannot be undone. A larger rate proposed there is first used by the next lookahead
        step, and the plain steps in between keep the rate just tested. A decrease applies at
        once. Returns the proposals for the plain steps and the deferred rates, if any.
        """
        rates = self._rates.groups
        if all(p.alpha <= rates[g].adapted for g, p in zip(unit_groups, proposals)):
            return proposals, None
        held = [Proposal(min(p.alpha, rates[g].adapted), p.decision) for g, p in zip(unit_groups, proposals)]
        return held, (list(unit_groups), [p.alpha for p in proposals])

    def _closure_free_step(self, loss: torch.Tensor | float | None) -> None:
        if self._loss_free_rule is None:
            raise ValueError(
                f"Newt.step was called without a closure, but strategy {self._strategy_name()!r} measures "
                "the loss at the lookahead point, which needs one: pass a closure that clears the gradients, "
                "computes the loss on the current batch, calls backward() and returns the loss, as in "
                "opt.step(closure); or use strategy='retsinas' or 'gen', which also work without a closure."
            )
        if loss is not None:
            _checked_loss(loss, "loss=")  # on every step, though it is read only at the start
        params = self._params()
        active = _active(
            params,
            "Newt.step() without a closure needs the gradients of the current batch: call "
            "loss.backward() before opt.step(), or pass a closure.",
        )
        units, unit_groups = self._units(active)
        local, grads = _locals(active), _locals([p.grad for p in active])
        if self._stopped_before_step(None, active, unit_groups):
            self._pending = None  # the measurement in progress would be NaN
            return None
        positions = self._positions(active, params)
        pending = self._pending
        if pending is not None and not (pending.indices == positions and pending.d0.numel() == len(units)):
            pending = None  # other parameters moved: start a new measurement
        loss_value = None
        checked = loss is not None and math.isfinite(self.blow_up_threshold)  # given the loss, check on: see AUTO
        watched = None  # the loss to check for a blow-up, read with the measurements (if any)
        if loss is not None and self._on_probation():
            loss_value, rejected = self._start_test_free(
                _loss_tensor(loss, "loss="), _loss_eps(loss), pending, local, unit_groups
            )
            if rejected:
                return None
        elif checked:
            watched = loss
        adapted = False
        if pending is not None:
            # d_{t-1} = theta_{t-1} - theta_t, with theta_{t-1} still in the snapshot buffer
            d1 = self._dots(grads, self._snapshot, local, units)
            pending.block_d0 = pending.d0 if pending.block_d0 is None else pending.block_d0 + pending.d0
            pending.block_d1 = d1 if pending.block_d1 is None else pending.block_d1 + d1
            pending.count += 1
            if pending.count == self.update_every:
                # The loss rides along in the transfer the measurements make anyway: no extra sync.
                losses = [] if watched is None else [_loss_tensor(watched, "loss=").reshape(1).to(d1.device)]
                values = torch.cat([*losses, pending.block_d0.to(d1.device), pending.block_d1])
                values = reduce_measurements(
                    values, len(losses), is_sharded=self._sharded, group=self.process_group
                ).tolist()
                f = values.pop(0) if losses else math.nan
                d0s, d1s = values[: len(units)], values[len(units) :]
                if self._loss_reference is not None and blew_up(self._loss_reference, f, self.blow_up_threshold):
                    if self.reject_spikes:
                        self._undo_free_step(self._loss_reference, f, d0s, d1s, local, unit_groups)
                        return None
                    proposals = self._shrunk_proposals(unit_groups, Decision.SPIKE)
                    self._finish(self._loss_reference, f, d0s, d1s, unit_groups, proposals, rejected=False)
                else:
                    if self._loss_reference is None and math.isfinite(f):
                        self._loss_reference = f
                    proposals, _ = self._adapt(None, None, d0s, d1s, unit_groups, _split(grads, units), checked=checked)
                    self._finish(math.nan, math.nan, d0s, d1s, unit_groups, proposals, rejected=False)
                pending.block_d0 = pending.block_d1 = None
                pending.count = 0
                adapted = True
        snapshot = self._guarded_inner_step(active, on_failure=lambda: setattr(self, "_pending", None))
        d0 = self._dots(grads, snapshot, local, units)
        if pending is None:
            pending = _Pending(positions, d0)
        pending.d0 = d0
        pending.loss = loss_value
        self._pending = pending
        if not adapted:
            self._finish_plain(math.nan)
        return None

    def _start_test_free(
        self,
        loss: torch.Tensor,
        loss_eps: float,
        pending: _Pending | None,
        local: list[torch.Tensor],
        unit_groups: list[int],
    ) -> tuple[float, bool]:
        """The start-up test of closure-free mode, on the losses given as ``step(loss=...)``.

        ``loss`` is this batch's loss at ``theta_t``; ``pending`` holds the previous step's loss
        (its batch, at ``theta_{t-1}``) and slope ``d0``, with ``theta_{t-1}`` in the snapshot
        buffer. The two losses come from different batches, so the Armijo condition gets the
        spike threshold as a tolerance (an untrained model's batch losses differ by far less,
        while a far-too-large first step multiplies the loss, around Adam: digits from 1
        2.3 -> 7.8, MNIST-1D from 0.1 2.3 -> 26, the byte-level model from 1 5.8 -> 33; or
        predicts a fall of many times the loss and falls by a fraction: the byte-level model
        from 0.1, predicted 31, 5.8 -> 4.6); a fall by the Armijo share proves the rate.
        A failed step is undone, like a failed start in lookahead mode and whatever
        ``reject_spikes`` says: ``theta_{t-1}`` comes back from the snapshot, the rate shrinks,
        and this batch's gradients, taken at the point given up, are not used. Returns the
        loss (reduced across ranks) and whether the step was undone.
        """
        device = local[0].device  # where the collective runs (NCCL needs the GPU)
        parts = [loss.reshape(1).to(device)] + ([] if pending is None else [pending.d0.to(device)])
        values = reduce_measurements(torch.cat(parts), 1, is_sharded=self._sharded, group=self.process_group).tolist()
        f1 = values[0]
        if self._loss_reference is None and math.isfinite(f1):
            self._loss_reference = f1
        if pending is None or pending.loss is None:
            return f1, False
        f0, d0s = pending.loss, values[1:]
        resolution = LOSS_ROUNDING_ULPS * loss_eps * max(abs(f0), abs(f1))
        verdict = next_batch_verdict(f0, f1, math.fsum(d0s), self.start_armijo, self.spike_threshold, resolution)
        if verdict is not False:
            self._start_proven = verdict is True
            return f1, False
        spike = spike_guard(1.0, f0, f1, self.spike_threshold, self.options) is not None or not math.isfinite(f1)
        decision = Decision.SPIKE if spike else Decision.INSUFFICIENT
        self._undo_free_step(f0, f1, d0s, [math.nan] * len(unit_groups), local, unit_groups, decision)
        return f1, True

    def _undo_free_step(
        self,
        f0: float,
        f1: float,
        d0s: list[float],
        d1s: list[float],
        local: list[torch.Tensor],
        unit_groups: list[int],
        decision: Decision = Decision.SPIKE,
    ) -> None:
        """Undo the last closure-free step: ``theta_{t-1}`` back from the snapshot, the rate shrunk,
        no inner step from the point given up (its gradients were taken there)."""
        _kernels.copy_(local, self._snapshot, foreach=self.foreach)
        self._pending = None
        self._finish(f0, f1, d0s, d1s, unit_groups, self._shrunk_proposals(unit_groups, decision), rejected=True)

    def _shrunk_proposals(self, unit_groups: list[int], decision: Decision) -> list[Proposal]:
        """Every unit's adapted rate cut by ``shrink``, with ``decision`` as the reason (a fault,
        a spike, an insufficient or blown-up step)."""
        rates = self._rates.groups
        return [shrunk_rate(rates[g].adapted, self.options, decision) for g in unit_groups]

    # ------------------------------------------------------------------ pieces of a step

    def _measure_fresh_slope(
        self, active: list[torch.Tensor], local: list[torch.Tensor], grads: list[torch.Tensor | None], units
    ) -> _NoiseProbe | None:
        """The probe of the last kept lookahead step, with its fresh-batch slope measured now.

        Call on a closure step after the first closure call (the gradients are this batch's, at
        the point the last step ended on) and before the snapshot buffer is overwritten. Returns
        the probe whose fresh slope still waits for a reduction, or None.
        """
        probe, self._probe = self._probe, None
        if probe is None:
            return None
        if probe.fresh is None:
            same = len(probe.params) == len(active) and all(p is q for p, q in zip(probe.params, active))
            if not (same and len(units) == len(probe.keys) and _kernels.snapshot_fits(self._snapshot, local)):
                return None  # other parameters moved since: d_t is not snapshot - theta
            probe.fresh = self._dots(grads, self._snapshot, local, units)
        return probe

    def _noise_keys(self, unit_groups: list[int]) -> list[int]:
        return list(unit_groups) if self.per_group else [-1]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _first_call(self, closure: Callable[[], Any], params: list[torch.Tensor]) -> tuple[Any, torch.Tensor, list]:
        loss = closure()
        f0 = _loss_tensor(loss, "first")
        active = _active(
            params,
            "after the closure ran, no parameter has a gradient: the closure must call "
            "loss.backward() before returning the loss.",
        )
        return loss, f0, active

    def _guarded_inner_step(
        self, active: list[torch.Tensor], on_failure: Callable[[], None] | None = None
    ) -> list[torch.Tensor]:
        """Snapshot ``theta_t`` and run the inner step; on any exception restore ``theta_t``."""
        local = _locals(active)
        snapshot = self._snapshot_of(local)
        try:
            self.inner.step()
        except BaseException:
            _kernels.copy_(local, snapshot, foreach=self.foreach)
            if on_failure is not None:
                on_failure()
            raise
        return snapshot

    def _units(self, active: list[torch.Tensor]) -> tuple[list[list[int]], list[int]]:
        """The rate units: positions in ``active`` per unit, and the group each unit adapts.

        One unit holding every parameter, adapting the reference group (the largest rate), or,
        with ``per_group=True``, one unit per group that has gradients and a nonzero rate.
        """
        if not self.per_group:
            rates = self._rates.groups
            reference = max(range(len(rates)), key=lambda g: rates[g].used)
            return [list(range(len(active)))], [reference]
        group_of = {id(p): g for g, group in enumerate(self.param_groups) for p in group["params"]}
        units: dict[int, list[int]] = {}
        for position, p in enumerate(active):
            g = group_of[id(p)]
            if self._rates.groups[g].used > 0.0:
                units.setdefault(g, []).append(position)
        if not units:
            raise RuntimeError("no param group with gradients has a nonzero learning rate: nothing to adapt.")
        groups = sorted(units)
        return [units[g] for g in groups], groups

    def _dots(
        self, grads: list[torch.Tensor | None], snapshot: list[torch.Tensor], active: list[torch.Tensor], units
    ) -> torch.Tensor:
        """``<grad, snapshot - param>`` per unit, as a float64 vector on the device (no sync)."""
        if len(units) == 1:
            return _kernels.step_dot(grads, snapshot, active, foreach=self.foreach).reshape(1)
        dots = [
            _kernels.step_dot(g, s, p, foreach=self.foreach)
            for g, s, p in zip(_split(grads, units), _split(snapshot, units), _split(active, units))
        ]
        return torch.stack([dot.to(dots[0].device) for dot in dots])

    def _positions(self, active: list[torch.Tensor], params: list[torch.Tensor]) -> tuple[int, ...]:
        index = {id(p): i for i, p in enumerate(params)}
        return tuple(index[id(p)] for p in active)

    def _stopped_before_step(self, f0: torch.Tensor | None, active: list[torch.Tensor], unit_groups: list[int]) -> bool:
        """Unscale the gradients (with a GradScaler) and check theta_t's numbers.

        Returns True when the step stopped here, before the inner step, with ``step_info`` set.
        """
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.inner)  # once per step: the scaler allows no more
            if not self._first_call_finite(None, active):
                # An fp16 overflow: the scaler backs off in its update(); the rate is not at fault.
                kept = [Proposal(self._rates.groups[g].adapted, Decision.NONFINITE) for g in unit_groups]
                nans = [math.nan] * len(unit_groups)
                f0_value = math.nan if f0 is None else float(f0)
                self._finish(f0_value, math.nan, nans, nans, unit_groups, kept, rejected=True)
                return True
        if self.reject_nonfinite and not self._first_call_finite(f0, active):
            self._reject_before_step(f0, unit_groups)
            return True
        return False

    def _first_call_finite(self, f0: torch.Tensor | None, params: list[torch.Tensor]) -> bool:
        finite = _kernels.all_finite(_locals([p.grad for p in params]), foreach=self.foreach)
        if f0 is not None:
            finite = finite & f0.to(finite.device).isfinite()
        # every rank must take the same branch (one rank's NaN stops the step everywhere)
        return bool(agree_all(finite, self.process_group))  # the one extra host sync

    def _vanished(self, grads: list[torch.Tensor | None]) -> bool:
        """True when the gradient is not zero: the step vanished only because the rate is tiny."""
        present = [g for g in grads if g is not None]
        nonzero = _kernels.any_nonzero(present, foreach=self.foreach)
        return agree_any(nonzero, present[0].device if present else torch.device("cpu"), self.process_group)

    def _adapt(
        self,
        f0: float | None,
        f1: float | None,
        d0s: list[float],
        d1s: list[float],
        unit_groups: list[int],
        grads_per_unit: list[list[torch.Tensor | None]],
        noise: list[float] | None = None,
        loss_eps: float = 0.0,
        checked: bool = False,
    ) -> tuple[list[Proposal], bool]:
        """The next adapted rate of each unit, and whether to undo the step.

        Faults first (non-finite numbers, a loss spike: they concern the whole step), then each
        unit's rule, fed the measurements without their estimated noise share ``noise`` (one per
        unit). ``f0``/``f1`` are None in closure-free mode, where they are not measured.
        ``loss_eps`` is the relative rounding unit of the closure's loss values. ``checked``:
        a closure-free step given its loss, with the blow-up check on (``auto`` uses ``gen`` there).
        """
        options = self.options
        rates = [self._rates.groups[g] for g in unit_groups]
        if not (all_finite(*d0s, *d1s) and (f0 is None or all_finite(f0, f1))):
            if self.grad_scaler is not None and all_finite(*d0s) and (f0 is None or all_finite(f0, f1)):
                # Only the lookahead's scaled gradients overflowed: the step itself is sound (its
                # loss is finite), the measurement is lost. Keep the step and the rate.
                return [Proposal(rate.adapted, Decision.NONFINITE) for rate in rates], False
            return self._shrunk_proposals(unit_groups, Decision.NONFINITE), self.reject_nonfinite
        if f0 is not None and spike_guard(1.0, f0, f1, self.spike_threshold, options) is not None:
            return self._shrunk_proposals(unit_groups, Decision.SPIKE), self.reject_spikes
        # the rounding error of the loss values: a change below it is not measured
        resolution = 0.0 if f0 is None else LOSS_ROUNDING_ULPS * loss_eps * max(abs(f0), abs(f1))
        if f0 is not None and self._on_probation():
            # the raw d0, not the noise-corrected one: the test asks what this batch's line did
            verdict = sufficient_decrease(f0, f1, math.fsum(d0s), self.start_armijo, resolution)
            if verdict is False:
                return self._shrunk_proposals(unit_groups, Decision.INSUFFICIENT), True
            self._start_proven = verdict is True
        loss_free = f0 is None or self.per_group
        rule = self._loss_free_rule if loss_free else self._rule
        if f0 is None and checked:
            rule = self._checked_free_rule
        f0_, f1_ = (0.0, 0.0) if f0 is None else (f0, f1)  # loss-free rules never read them
        # Keeping the rate on an uphill step is safe only where every step is measured and a
        # spike undoes it: in lazy mode the plain steps in between ran at the kept rate unguarded
        # (digits, Adam: worst final loss 0.066 -> 0.65), and closure-free mode has no loss.
        # (built-in rules only: a custom rule's answer to an uphill step is its own choice)
        hold_ascents = self.hold_on_ascent and self.update_every == 1 and f0 is not None and rule in BUILTIN_RULES
        proposals = []
        for rate, d0, d1, grads, share in zip(rates, d0s, d1s, grads_per_unit, noise or [0.0] * len(rates)):
            if rate.used <= 0.0:  # a scheduler took the rate to zero: the step measured nothing
                proposals.append(Proposal(rate.adapted, Decision.PLAIN))
                continue
            f1_unit, d0_unit, d1_unit = debiased(f1_, d0, d1, share) if share else (f1_, d0, d1)
            unit_rule, f1_seen = rule, f1
            if rule in BUILTIN_RULES and abs(d0) <= resolution:
                # The step's predicted change is below the loss values' rounding, so f1 - f0 is
                # rounding alone: gen read f1 == f0 as a parabola with its minimum at alpha / 2
                # and halved a tiny start forever. The slopes still measure the line.
                unit_rule, f1_seen = SLOPE_FORMS[rule], f0
            if rate.multiplier == 1.0:
                proposal = unit_rule(rate.adapted, f0_, f1_unit, d0_unit, d1_unit, options)
            elif unit_rule in BUILTIN_RULES:
                proposal = scheduled_proposal(
                    unit_rule, rate.adapted, rate.used, f0_, f1_unit, d0_unit, d1_unit, options
                )
            else:  # a custom rule adapts the rate it saw used; the multiplier is taken back out
                proposal = unit_rule(rate.used, f0_, f1_unit, d0_unit, d1_unit, options)
                proposal = Proposal(
                    clamp_alpha(proposal.alpha / rate.multiplier, options.alpha_min, options.alpha_max),
                    proposal.decision,
                )
            if proposal.decision is Decision.NONCONVEX and d0 == 0.0 and d1 == 0.0 and self._vanished(grads):
                # d = 0 exactly: theta did not move, and these are the gradients of theta_t
                proposal = grown_rate(rate.adapted, options)
            elif (
                rule in BUILTIN_RULES  # a custom rule's "nonconvex" is its own choice
                and proposal.decision is Decision.NONCONVEX
                and _nearly_linear(d0_unit, d1_unit, f0, f1_seen)
            ):
                proposal = grown_rate(rate.adapted, options, Decision.LINEAR)
            if hold_ascents:
                proposal = held_on_ascent(rate.adapted, d0, proposal)
            proposals.append(proposal)
        return proposals, False

    def _finish(
        self,
        f0: float,
        f1: float,
        d0s: list[float],
        d1s: list[float],
        unit_groups: list[int],
        proposals: list[Proposal],
        *,
        rejected: bool,
        noise: list[float] | None = None,
    ) -> None:
        rates = self._rates.groups
        noise = noise or [0.0] * len(unit_groups)
        before = [rate.used for rate in rates]
        self._deferred = None  # a newer decision supersedes a held-back increase
        self._set_adapted(unit_groups, [p.alpha for p in proposals])
        after = [rate.used for rate in rates]
        reference = max(range(len(unit_groups)), key=lambda u: before[unit_groups[u]])
        groups = None
        if self.per_group:
            groups = tuple(
                GroupStepInfo(g, d0, d1, before[g], after[g], Decision(p.decision), share)
                for g, d0, d1, p, share in zip(unit_groups, d0s, d1s, proposals, noise)
            )
        self.step_info = StepInfo(
            f0,
            f1,
            math.fsum(d0s),
            math.fsum(d1s),
            before[unit_groups[reference]],
            after[unit_groups[reference]],
            Decision(proposals[reference].decision),
            rejected,
            groups,
            noise[reference],
        )
        self._steps += 1
        self._rejected += int(rejected)

    def _set_adapted(self, unit_groups: list[int], alphas: list[float]) -> None:
        """Give each unit its new adapted rate (one global rate: scale every group) and write them."""
        if self.per_group:
            for g, alpha in zip(unit_groups, alphas):
                self._rates.groups[g].adapted = alpha
        else:
            self._rates.scale_all(unit_groups[0], alphas[0])
        self._rates.write(self.param_groups)

    def _remember_loss(self, f0: float) -> None:
        """Keep a closure step's loss at ``theta_t`` among the last ``RISE_WINDOW`` (see ``rise_threshold``)."""
        if math.isfinite(f0):
            self._recent_losses.append(f0)
            del self._recent_losses[:-RISE_WINDOW]

    def _finish_plain(self, f0: float) -> None:
        alpha = max(rate.used for rate in self._rates.groups)
        self._steps += 1
        if self._deferred is not None and self._steps % self.update_every == 0:
            # the next step is a lookahead step: it uses, and so tests, the held-back rate
            self._set_adapted(*self._deferred)
            self._deferred = None
        alpha_next = max(rate.used for rate in self._rates.groups)
        self.step_info = StepInfo(f0, math.nan, math.nan, math.nan, alpha, alpha_next, Decision.PLAIN)

    def _reject_before_step(self, f0: torch.Tensor | None, unit_groups: list[int]) -> None:
        """A non-finite loss or gradient at ``theta_t``: skip the inner step, shrink the rate."""
        # Nothing has moved yet: skipping the inner step keeps its state clean too.
        proposals = self._shrunk_proposals(unit_groups, Decision.NONFINITE)
        nans = [math.nan] * len(unit_groups)
        f0_value = math.nan if f0 is None else float(f0)
        self._finish(f0_value, math.nan, nans, nans, unit_groups, proposals, rejected=True)

    def _snapshot_of(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``params`` into the reused snapshot buffer (reallocated only if they change)."""
        if not _kernels.snapshot_fits(self._snapshot, params):
            self._snapshot = None  # free the old buffer before allocating the new one
            self._snapshot = _kernels.new_snapshot(params)
        _kernels.copy_(self._snapshot, params, foreach=self.foreach)
        return self._snapshot

    # ------------------------------------------------------------------ learning rates

    @property
    def alpha(self) -> float:
        """The current global rate: the largest learning rate among the param groups."""
        return max(float(group["lr"]) for group in self.param_groups)

    # ------------------------------------------------------------------ Optimizer plumbing

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, as the inner optimizer does."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (and so to this one)."""
        if "inner" not in self.__dict__:
            # Optimizer.__init__ registers its throwaway groups through this method.
            super().add_param_group(param_group)
            return
        self.inner.add_param_group(param_group)
        _check_group_lr(self.inner.param_groups[-1], len(self.inner.param_groups) - 1)
        self._sharded = sharded(self._params())

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus Newt's own counters under ``"newt"``.

        The learning rates (the adapted rate included) are in ``param_groups``, as usual.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.inner.state_dict()
        state_dict["newt"] = {
            "steps": self._steps,
            "rejected": self._rejected,
            "start_proven": self._start_proven,
            "rates": self._rates.state_dict(),
            "pending": self._pending_state(),
            "noise": {"averages": self._noise.state_dict(), "probe": self._probe_state()},
            "deferred": None if self._deferred is None else [list(self._deferred[0]), list(self._deferred[1])],
            "given_loss": None if self._given_loss is None else float(self._given_loss),
            "loss_reference": self._loss_reference,
            "recent_losses": list(self._recent_losses),
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the inner optimizer's state, the learning rates and Newt's counters.

        A plain inner-optimizer state dict (without ``"newt"``) is accepted too.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        newt_state = state_dict.pop("newt", {})
        self.inner.load_state_dict(state_dict)
        # The inner optimizer rebuilt its containers: share the new ones.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self._steps = int(newt_state.get("steps", 0))
        self._rejected = int(newt_state.get("rejected", 0))
        # Checkpoints from before the start check: a run that took steps is past its start.
        self._start_proven = bool(newt_state.get("start_proven", self._steps > 0))
        self._rates = Rates()
        if "rates" in newt_state:
            self._rates.load_state_dict(newt_state["rates"])
        self._rates.sync(self.param_groups)
        self._load_pending(newt_state.get("pending"))
        noise_state = newt_state.get("noise", {})
        self._noise = NoiseEstimate(self.noise_correction)
        self._noise.load_state_dict(noise_state.get("averages", []))
        self._load_probe(noise_state.get("probe"))
        deferred = newt_state.get("deferred")
        self._deferred = None if deferred is None else ([int(g) for g in deferred[0]], [float(a) for a in deferred[1]])
        # absent from checkpoints made before rise_threshold: the window refills within RISE_WINDOW steps
        self._recent_losses = [float(x) for x in newt_state.get("recent_losses", [])][-RISE_WINDOW:]
        given = newt_state.get("given_loss")  # absent from checkpoints made before give_loss()
        self._given_loss = None if given is None else float(given)
        reference = newt_state.get("loss_reference")
        self._loss_reference = None if reference is None else float(reference)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _pending_state(self) -> dict[str, Any] | None:
        """Closure-free mode's measurement in progress: ``d_{t-1}`` still needs ``theta_{t-1}``."""
        pending = self._pending
        if pending is None:
            return None
        return {
            "indices": list(pending.indices),
            "snapshot": list(self._snapshot),
            "d0": pending.d0,
            "block_d0": pending.block_d0,
            "block_d1": pending.block_d1,
            "count": pending.count,
            "loss": pending.loss,
        }

    def _load_pending(self, state: dict[str, Any] | None) -> None:
        self._pending = None
        if state is None:
            return
        indices = tuple(int(i) for i in state["indices"])
        self._restore_snapshot(indices, state["snapshot"], "closure-free measurement")
        device = self._snapshot[0].device

        def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, copy=True)

        loss = state.get("loss")  # absent from checkpoints made before step(loss=...)
        self._pending = _Pending(
            indices,
            moved(state["d0"]),
            moved(state["block_d0"]),
            moved(state["block_d1"]),
            int(state["count"]),
            None if loss is None else float(loss),
        )

    def _probe_state(self) -> dict[str, Any] | None:
        """The noise probe in progress; before its fresh slope is measured it needs ``theta_t``."""
        probe = self._probe
        if probe is None:
            return None
        state: dict[str, Any] = {"keys": list(probe.keys), "d0": list(probe.d0), "d1": list(probe.d1)}
        if probe.fresh is not None:
            state["fresh"] = probe.fresh
        else:
            state["indices"] = list(self._positions(probe.params, self._params()))
            state["snapshot"] = list(self._snapshot)
        return state

    def _load_probe(self, state: dict[str, Any] | None) -> None:
        self._probe = None
        if state is None:
            return
        keys, d0, d1 = [int(k) for k in state["keys"]], [float(v) for v in state["d0"]], [float(v) for v in state["d1"]]
        if "fresh" in state:
            self._probe = _NoiseProbe([], keys, d0, d1, state["fresh"].clone())
            return
        indices = tuple(int(i) for i in state["indices"])
        params = self._restore_snapshot(indices, state["snapshot"], "noise measurement")
        self._probe = _NoiseProbe(params, keys, d0, d1)

    def _restore_snapshot(self, indices: tuple[int, ...], saved: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Load a checkpoint's snapshot of the parameters at ``indices``; return those parameters."""
        params = self._params()
        if len(indices) != len(saved) or any(i >= len(params) for i in indices):
            raise ValueError(
                f"the checkpoint's {what} does not match this optimizer's parameters: "
                "load it into an optimizer built over the same parameters, in the same order."
            )
        chosen = [params[i] for i in indices]
        self._snapshot = [
            tensor.to(device=shard.device, dtype=shard.dtype, copy=True)
            for shard, tensor in zip(_locals(chosen), saved)
        ]
        return chosen

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _strategy_name(self) -> str:
        return self.strategy if isinstance(self.strategy, str) else getattr(self.strategy, "__name__", "custom")

    def __repr__(self) -> str:
        return f"Newt(strategy={self._strategy_name()!r}, options={self.options}, inner={self.inner!r})"


# ---------------------------------------------------------------------- validation helpers


def _check_inner(inner: object) -> None:
    if isinstance(inner, Newt):
        raise TypeError("Newt cannot wrap another Newt: wrap the inner optimizer once.")
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"Newt wraps a torch.optim.Optimizer, got {type(inner).__name__}. Build the inner "
            "optimizer first, e.g. Newt(torch.optim.Adam(model.parameters(), lr=1e-3))."
        )
    for index, group in enumerate(inner.param_groups):
        _check_group_lr(group, index)
        if group.get("differentiable", False):
            raise ValueError(
                f"param group {index} has differentiable=True: Newt steps under torch.no_grad() and "
                "cannot differentiate through the inner step. Build the inner optimizer with "
                "differentiable=False."
            )
    if max(float(g["lr"]) for g in inner.param_groups) <= 0.0:
        raise ValueError("every param group has lr=0: give at least one group a positive initial learning rate.")


def _check_group_lr(group: dict[str, Any], index: int) -> None:
    if "lr" not in group:
        raise ValueError(
            f"param group {index} has no 'lr': Newt adapts the learning rate and needs an inner "
            "optimizer that reads it from group['lr'] (SGD, Adam, AdamW, RMSprop, Lion, ...)."
        )
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"param group {index} has lr={group['lr']!r}: it must be a finite number >= 0.")


def _check_threshold(name: str, value: object, meaning: str) -> float:
    """A relative loss rise that triggers a check: in (0, inf], where ``math.inf`` turns it off."""
    return check_real(
        name, value, low=0, high=math.inf, low_open=True, high_open=False, hint=f"{name} is {meaning} (math.inf: off)."
    )


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}.")
    return value


def _resolve_strategy(strategy: object) -> Rule:
    """The rule a strategy applies when the loss values are measured."""
    names = ", ".join(map(repr, (AUTO, *STRATEGIES)))
    if isinstance(strategy, str):
        if strategy == AUTO:
            return STRATEGIES["gen"]
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}; valid names are {names}, "
                "or pass a callable rule(alpha, f0, f1, d0, d1, options)."
            )
        return STRATEGIES[strategy]
    if callable(strategy):
        return guard_custom_rule(strategy)
    raise TypeError(f"strategy must be one of {names} or a callable, got {strategy!r}.")


def _loss_eps(loss: object) -> float:
    """The relative rounding unit of a closure's loss: its dtype's, float32's for a Python number
    (most often the ``.item()`` of a float32 loss)."""
    if isinstance(loss, torch.Tensor) and loss.is_floating_point():
        return torch.finfo(loss.dtype).eps
    return torch.finfo(torch.float32).eps


def _loss_tensor(loss: object, which: str) -> torch.Tensor:
    """The closure's loss as a detached float64 scalar tensor (no host sync).

    ``which`` names the closure call ("first", "second (lookahead)"), or is ``"loss="`` for the
    value given to a closure-free ``step``.
    """
    loss = _checked_loss(loss, which)
    if isinstance(loss, torch.Tensor):
        return loss.detach().reshape(()).to(torch.float64)
    return torch.tensor(float(loss), dtype=torch.float64)


def _checked_loss(loss: object, which: str) -> torch.Tensor | numbers.Real:
    """``loss`` itself if it is a scalar tensor or a real number; otherwise a ``TypeError``."""
    given = {"loss=": "step(loss=...)", "give_loss()": "give_loss()"}.get(which)
    source = f"{given} got" if given else f"the {which} closure call returned"
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(
                f"{source} a tensor of shape {tuple(loss.shape)}; it must "
                "be the scalar loss (reduce it, e.g. with .mean())."
            )
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return loss
    hint = "pass the batch's loss tensor" if given else "did you forget 'return loss'?"
    raise TypeError(f"{source} {type(loss).__name__}; it must be the loss as a scalar tensor or a number ({hint}).")


def _check_dense(params: list[torch.Tensor]) -> None:
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError(
            "Newt does not support sparse gradients (e.g. nn.Embedding(sparse=True)): use dense "
            "gradients (sparse=False)."
        )


LOSS_ROUNDING_ULPS = 64
"""The rounding error of a loss value, in units of its dtype's relative precision: a batch mean
sums hundreds of rounded terms, and the start-up Armijo test is not applied to a decrease smaller
than this (it could fail on rounding alone)."""
LINEAR_TOLERANCE = 0.1
"""A descending step whose slope changed by less than this share of ``d0`` counts as nearly
linear: a quadratic through it has its minimum beyond ``10 * alpha``."""


def _nearly_linear(d0: float, d1: float, f0: float | None, f1: float | None) -> bool:
    """The step went down a nearly straight line: far too short to measure any curvature.

    The rules keep the rate when the curvature is not safely positive, which at a tiny rate it
    never is: the curvature is below the measurement noise (float32 losses and gradients), so a
    start at 1e-5 stayed there for dozens of steps. When the slope is positive and nearly
    unchanged along the step and the loss did not rise, the minimum lies far beyond; the spike
    policy backs off if growing goes too far. Without the losses (closure-free mode) nothing
    confirms the descent: there, after an overshoot, the slopes of two batches can agree while
    the loss climbs, and growing made the rate run away (digits, ``gen``), so the rate is kept.
    """
    if f0 is None or f1 is None:
        return False
    return d0 > 0.0 and abs(d0 - d1) <= LINEAR_TOLERANCE * d0 and f1 <= f0


def _split(items: list, units: list[list[int]]) -> list[list]:
    return [[items[i] for i in unit] for unit in units]


def _active(params: list[torch.Tensor], missing: str) -> list[torch.Tensor]:
    """The parameters that have a (dense) gradient; ``missing`` is the error when none has."""
    active = [p for p in params if p.grad is not None]
    if not active:
        raise RuntimeError(missing)
    _check_dense(active)
    return active


def _locals(tensors: list) -> list:
    return [local_tensor(t) for t in tensors]

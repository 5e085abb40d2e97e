"""``Newt``: a ``torch.optim.Optimizer`` that adapts the learning rate of any inner optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from newt import _checkpoint as checkpoint
from newt._noise import NoiseEstimate
from newt._rates import learning_rates, restore_learning_rates
from newt._state import State
from newt.distributed import local_tensor
from newt.modes import ClosureFree, Lazy, Lookahead, Settings
from newt.modes.lazy import DEFERRAL
from newt.options import Policies, RuleOptions, check_group, check_initial_rate, check_inner, check_option, merged
from newt.pipeline.gather import checked_loss
from newt.pipeline.measure import Measurer
from newt.schedulers import ABSOLUTE_SCHEDULE, ScheduleWarning
from newt.step_info import GroupStepInfo, StepInfo
from newt.strategies import AUTO

Closure = Callable[[], torch.Tensor | float]

__all__ = ["GroupStepInfo", "Newt", "ScheduleWarning", "StepInfo"]


class Newt(torch.optim.Optimizer):
    """Adapt the learning rate of any inner optimizer with a Newton-like rule.

    ``opt.step(closure)`` calls the closure at ``theta_t``, lets the inner optimizer take one
    step with the current rate (landing on the lookahead point ``theta_{t+1}``), calls the
    closure again there on the same batch, and feeds the measured numbers (see
    :class:`StepInfo`) to the rule. ``loss.backward(); opt.step(loss=loss)`` is the closure-free
    mode: the next batch's gradient stands in for the lookahead's. Afterwards every param
    group's ``"lr"`` holds the rate the next step uses. ``param_groups`` and ``state`` are the
    inner optimizer's own objects, so schedulers, loggers and checkpoints see the usual
    structure. The modes, the rules and the policies: ``docs/modes.md``, ``docs/math.md``.

    Args:
        inner: The optimizer whose steps are taken; its learning rates are the initial rates.
        strategy: ``"auto"`` (the default), ``"gen"``, ``"taylor"``, ``"retsinas"``,
            ``"gen-three-point"``, ``"gen-exact"`` (see :mod:`newt.rules`), or a callable with
            the signature of those rules.
        update_every: Adapt the rate every ``update_every`` steps only (lazy mode with a
            closure; blocks of steps closure-free).
        per_group: Adapt each param group's rate from its own slopes (``retsinas``, ``gen``).
        forward_only: Evaluate only the loss at the lookahead point, the closure's
            ``backward()`` skipped there and its forward pass run without autograd
            (``docs/modes/lookahead.md``, "Forward-only lookahead"). None (the default): where
            the rule reads no gradient there, that is ``gen`` and ``"auto"`` with a closure,
            ``gen-three-point`` and ``gen-exact``. False: measure the lookahead's gradient
            anyway (a closure that differentiates by other means than ``backward()``).
        max_grad_norm: Clip the gradients the inner step uses to this total norm, as
            ``torch.nn.utils.clip_grad_norm_`` would; the rule still measures the unclipped
            gradients (clipping inside the closure would clip the two calls differently).
        policies: The policies' thresholds (:class:`newt.Policies`; ``Policies.off()``: none).
        rule_options: The rules' hyperparameters (:class:`newt.RuleOptions`).
        grad_scaler: The ``torch.amp.GradScaler`` of an fp16 loop (whose own ``step`` refuses
            closures): Newt unscales the gradients and skips the steps that overflow.
        process_group: The ``torch.distributed`` group whose ranks agree on the rate.
        foreach: Use the multi-tensor kernels (default) or a per-tensor loop.
        **options: Any field of :class:`newt.Policies` or :class:`newt.RuleOptions` by name
            (``spike_threshold=0.5``, ``gamma=1.0``), over ``policies`` and ``rule_options``.

    Every value is checked against :data:`newt.options.OPTIONS`; the table of the options in
    each mode is :func:`newt.modes.policy_table`.

    Raises:
        TypeError: ``inner`` is not a ``torch.optim.Optimizer``, an option has the wrong type,
            or an option name is unknown.
        ValueError: An option is out of range, the strategy is unknown, a param group has no
            usable ``"lr"``, or the inner optimizer is ``differentiable``.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        strategy: str | Callable[..., Any] = AUTO,
        *,
        update_every: int = 1,
        per_group: bool = False,
        forward_only: bool | None = None,
        max_grad_norm: float | None = None,
        policies: Policies | None = None,
        rule_options: RuleOptions | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        foreach: bool = True,
        **options: Any,
    ) -> None:
        rule_options, policies = merged(rule_options, policies, options)
        check_inner(inner, rule_options)
        settings = Settings.build(
            strategy, rule_options, policies, update_every, per_group, grad_scaler, max_grad_norm, forward_only
        )
        measurer = Measurer(check_option("foreach", foreach), process_group)
        # Optimizer.__init__ sets up the hook registries; it builds throwaway groups that are
        # replaced right after by the inner optimizer's own list (see add_param_group).
        super().__init__([{"params": list(g["params"])} for g in inner.param_groups], defaults={})
        self.inner = inner
        self.defaults = inner.defaults
        self.param_groups = inner.param_groups
        self.state = inner.state
        self._settings = settings
        self._measurer = measurer
        measurer.watch(self._params())
        self._closure_mode = (Lazy if settings.update_every > 1 else Lookahead)(inner, settings, measurer)
        self._closure_free = ClosureFree(inner, settings, measurer)
        self._state = State(noise=NoiseEstimate(policies.noise_correction))
        self._state.rates.sync(self.param_groups)
        self._stepping = False  # a step is running: its closure must not call step() again

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
                lazy mode's plain steps). Without a closure (after your own ``backward()``),
                the step is closure-free.
            loss: Closure-free mode only: the loss whose ``backward()`` filled the gradients
                (this batch's, at ``theta_t``). It gives the closure-free step the start-up
                test that a closure gives the others, and after the start the blow-up check
                (``docs/modes/closure-free.md``). A loop that calls ``step()`` bare can give
                it beforehand with :meth:`give_loss`.

        Returns:
            The loss the first closure call returned (at ``theta_t``); None without a closure.

        After the step the parameters' ``.grad`` hold the gradients of the lookahead point (of
        ``theta_t`` on plain steps, on steps stopped before the inner step, and closure-free).
        A rejected step (``step_info.rejected``) leaves the parameters at ``theta_t``. If the
        closure, the inner step or the rule raises, the exception propagates unchanged, and
        the parameters, the rates and Newt's own state are as before (``docs/reliability.md``).
        """
        return self._transaction(closure, loss)

    def _transaction(self, closure: Closure | None, loss: torch.Tensor | float | None) -> Any:
        if self._stepping:
            raise RuntimeError(
                "Newt.step was called from inside the closure of a step in progress: the closure "
                "must only compute the loss and its gradients (zero_grad, forward, backward, return "
                "the loss); call opt.step(closure) from the training loop."
            )
        # The step works on a copy of Newt's state and keeps it only once nothing can raise.
        work, lrs, writes = self._state.copy(), learning_rates(self.param_groups), self._measurer.writes
        self._stepping = True
        try:
            result = self._step(work, closure, loss)
        except BaseException:
            restore_learning_rates(self.param_groups, lrs)
            if self._measurer.writes != writes:
                # The step's snapshot overwrote theta_{t-1}, which a measurement in progress (the
                # noise probe, closure-free mode's last step) still needed: it is dropped.
                self._state.probe = self._state.pending = None
            raise
        finally:
            self._stepping = False
        self._state = work
        return result

    def _step(self, work: State, closure: Closure | None, loss: torch.Tensor | float | None) -> Any:
        given, work.given_loss = work.given_loss, None
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
        if work.rates.sync(self.param_groups):
            warnings.warn(ABSOLUTE_SCHEDULE, ScheduleWarning, stacklevel=4)
        if closure is None:
            work.probe = None  # the closure-free step reuses the snapshot buffer
            return self._closure_free.step(work, loss)
        work.pending = None  # a closure step ends any closure-free measurement in progress
        return self._closure_mode.step(work, closure)

    def give_loss(self, loss: torch.Tensor | float) -> None:
        """Give the next closure-free ``step()`` its loss, for loops that call ``step()`` bare.

        ``opt.give_loss(loss); opt.step()`` is ``opt.step(loss=loss)``, for training loops that
        call ``optimizer.step()`` themselves, such as the Hugging Face ``Trainer``
        (:class:`newt.integrations.huggingface.NewtTrainer` gives it the loss this way). A
        later call before the step replaces the loss; the step uses it once.

        Args:
            loss: The loss whose ``backward()`` filled the gradients the next step uses, a
                scalar tensor (detached here; reading it waits for the step) or a number. With
                gradient accumulation, the sum of the micro-batches' losses as each was scaled
                for its ``backward()``.

        Raises:
            TypeError: ``loss`` is not a scalar tensor or a real number. The next ``step()``
                raises ``ValueError`` if it gets a closure or ``loss=`` as well.
        """
        loss = checked_loss(loss, "give_loss()")
        # a copy: a loop may overwrite its loss buffer before the step reads it
        self._state.given_loss = loss.detach().clone() if isinstance(loss, torch.Tensor) else loss

    # ------------------------------------------------------------------ what a user may read

    @property
    def strategy(self) -> str | Callable[..., Any]:
        """The strategy as given (a name or the custom rule)."""
        return self._settings.strategy.source

    @property
    def options(self) -> RuleOptions:
        """The rules' hyperparameters."""
        return self._settings.checks.options

    @property
    def policies(self) -> Policies:
        """The policies' thresholds and switches."""
        return self._settings.policies

    @property
    def step_info(self) -> StepInfo | None:
        """The measurements and decision of the latest step (None before the first)."""
        return self._state.info

    @property
    def alpha(self) -> float:
        """The current global rate: the largest learning rate among the param groups."""
        return max(float(group["lr"]) for group in self.param_groups)

    @property
    def adapted_rates(self) -> tuple[float, ...]:
        """Per param group, the rate Newt adapted, before a scheduler's factor (``docs/schedulers.md``)."""
        return tuple(rate.adapted for rate in self._state.rates.groups)

    @property
    def schedule_factors(self) -> tuple[float, ...]:
        """Per param group, the factor a scheduler applies to the adapted rate (1 without one)."""
        return tuple(rate.multiplier for rate in self._state.rates.groups)

    @property
    def snapshot(self) -> tuple[torch.Tensor, ...]:
        """The one parameter-sized buffer Newt keeps (empty before the first step), read-only.

        It holds ``theta_t`` of the last step (rank-local shards under FSDP2): where a
        rejected step went back to, and, closure-free, the point before the last step.
        """
        return tuple(self._measurer.buffer or ())

    @property
    def update_every(self) -> int:
        return self._settings.update_every

    @property
    def per_group(self) -> bool:
        return self._settings.per_group

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
        index = len(self.inner.param_groups)
        # checked before it joins: a refused group must not stay behind in the inner optimizer
        check_group({**self.inner.defaults, **param_group}, index)
        lr = float(param_group.get("lr", self.inner.defaults.get("lr", 0.0)))
        if lr > self.alpha:
            check_initial_rate(lr, self.options)
        self.inner.add_param_group(param_group)
        self._measurer.watch(self._params())

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus Newt's own state under ``"newt"``.

        The learning rates (the adapted rate included) are in ``param_groups``, as usual.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.inner.state_dict()
        state, params = self._state, self._params()
        newt_state = {"steps": state.steps, "rejected": state.rejected, "rates": state.rates.state_dict()}
        for part in self._stateful():
            newt_state.update(part.state_dict(state, params, self._measurer))
        state_dict["newt"] = newt_state
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the inner optimizer's state, the learning rates and Newt's own state.

        A plain inner-optimizer state dict (without ``"newt"``) is accepted too. Newt's part is
        checked before anything is loaded: a value it cannot resume from (a NaN rate, a
        snapshot of other shapes) raises ``ValueError`` and leaves the optimizer as it was.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        saved = state_dict.pop("newt", {})
        state, buffer = self._loaded(saved, len(state_dict.get("param_groups", self.param_groups)))
        self.inner.load_state_dict(state_dict)
        # The inner optimizer rebuilt its containers: share the new ones.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        state.rates.sync(self.param_groups)
        if buffer is not None:
            self._measurer.load(*buffer)
        self._state = state
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _loaded(self, saved: dict[str, Any], n_groups: int) -> tuple[State, Any]:
        """Newt's state read from a checkpoint's ``"newt"`` entry, checked, and the snapshot to load."""
        state = State(noise=NoiseEstimate(self.policies.noise_correction))
        state.steps = checkpoint.count(saved.get("steps", 0), "steps")
        state.rejected = checkpoint.count(saved.get("rejected", 0), "rejected")
        if "rates" in saved:
            state.rates.load_state_dict(checkpoint.rates(saved["rates"], n_groups))
        buffer: list[Any] = []

        def restore(indices: Sequence[int], snapshot: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
            chosen = self._checked_snapshot(indices, snapshot, what)
            buffer[:] = [[local_tensor(p) for p in chosen], snapshot]
            return chosen

        for part in self._stateful():
            part.load_state_dict(state, saved, restore)
        return state, buffer or None

    def _stateful(self) -> tuple[Any, ...]:
        """The parts that own a fragment of ``state_dict()["newt"]``, in the order they load."""
        settings = self._settings
        return (settings.start, self._closure_free, self._closure_mode.noise, DEFERRAL, settings.rise, settings.blow_up)

    def _checked_snapshot(self, indices: Sequence[int], saved: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
        """The parameters at ``indices``, once the checkpoint's snapshot of them is seen to fit them."""
        params = self._params()
        indices = [checkpoint.count(i, f"{what} indices") for i in indices]
        if len(indices) != len(saved) or any(i >= len(params) for i in indices):
            raise checkpoint.CheckpointError(
                f"the checkpoint's {what} does not match this optimizer's parameters: "
                "load it into an optimizer built over the same parameters, in the same order."
            )
        chosen = [params[i] for i in indices]
        for p, tensor in zip(chosen, saved):
            checkpoint.tensor(tensor, f"{what} snapshot", shape=local_tensor(p).shape)
        return chosen

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's: the hook registries and the patched step survive

    def __repr__(self) -> str:
        return f"Newt(strategy={self._settings.strategy.name!r}, options={self.options}, inner={self.inner!r})"

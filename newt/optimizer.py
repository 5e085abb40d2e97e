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
from newt.rules import DEFAULT_OPTIONS, STRATEGIES, Decision, Rule, RuleOptions, guard_custom_rule

Closure = Callable[[], torch.Tensor | float]

__all__ = ["Newt", "StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """What one ``Newt.step`` measured and decided, for logging.

    Attributes:
        f0: Loss at the start of the step, ``L(theta_t)``.
        f1: Loss at the lookahead point ``theta_{t+1}``, same batch.
        d0: ``<grad L(theta_t), d_t>`` with the step ``d_t = theta_t - theta_{t+1}``.
        d1: ``<grad L(theta_{t+1}), d_t>``.
        alpha: The rate the step used (the largest group's learning rate).
        alpha_next: The rate the next step will use.
        decision: Why the rule chose ``alpha_next`` (a :class:`newt.Decision`, a ``str``).
    """

    f0: float
    f1: float
    d0: float
    d1: float
    alpha: float
    alpha_next: float
    decision: Decision


class Newt(torch.optim.Optimizer):
    """Adapt the learning rate of any inner optimizer with a Newton-like rule.

    Each ``step(closure)`` evaluates the closure at ``theta_t``, lets the inner optimizer take
    one step with the current rate (landing on the lookahead point ``theta_{t+1}``), evaluates
    the closure again there on the same batch, and feeds the four measured numbers (see
    :class:`StepInfo`) to the update rule. Afterwards every param group's ``"lr"`` holds the
    rate the next step will use.

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so schedulers,
    loggers and checkpoints see the usual structure.

    Args:
        inner: The optimizer whose steps are taken, e.g. ``torch.optim.Adam(model.parameters(),
            lr=1e-3)``. Its learning rates are the initial rates.
        strategy: ``"retsinas"``, ``"taylor"``, ``"gen"`` (see :mod:`newt.rules`), or a callable
            with the same signature as those rules.
        gamma: Newton damping of ``retsinas`` and ``taylor``, in (0, 1].
        smoothing: Moving-average coefficient of ``gen``, in [0, 1).
        alpha_min: Smallest rate, > 0.
        alpha_max: Largest rate, > ``alpha_min``.
        max_factor: Each update changes the rate by a factor in ``[1/max_factor, max_factor]``.
        eps: Relative guard of the rules' divisions, >= 0.
        nonfinite_shrink: Factor in (0, 1) applied to the rate when a measured number is NaN or
            infinite.
        foreach: Use the multi-tensor ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    With several param groups, one global rate keeps the ratios between the groups' learning
    rates: the rule adapts the largest one and every group is scaled by the same factor.

    Raises:
        TypeError: ``inner`` is not a ``torch.optim.Optimizer``, or an option has the wrong type.
        ValueError: An option is out of range, the strategy is unknown, a param group has no
            usable ``"lr"``, or the inner optimizer is ``differentiable``.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        strategy: str | Callable[..., Any] = "taylor",
        *,
        gamma: float = DEFAULT_OPTIONS.gamma,
        smoothing: float = DEFAULT_OPTIONS.smoothing,
        alpha_min: float = DEFAULT_OPTIONS.alpha_min,
        alpha_max: float = DEFAULT_OPTIONS.alpha_max,
        max_factor: float = DEFAULT_OPTIONS.max_factor,
        eps: float = DEFAULT_OPTIONS.eps,
        nonfinite_shrink: float = DEFAULT_OPTIONS.nonfinite_shrink,
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
            nonfinite_shrink=nonfinite_shrink,
        )
        self.strategy = strategy
        self._rule = _resolve_strategy(strategy)
        if not isinstance(foreach, bool):
            raise TypeError(f"foreach must be True or False, got {foreach!r}.")
        self.foreach = foreach
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
        self._snapshot: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | float:  # type: ignore[override]
        """Take one inner step and adapt the learning rate.

        Args:
            closure: Clears the gradients, computes the loss on the current batch, calls
                ``backward()`` and returns the loss. It is called twice per step: at
                ``theta_t`` and at the lookahead point, with the same random state, and with
                module buffers (BatchNorm statistics) restored after the second call.

        Returns:
            The loss the first closure call returned (at ``theta_t``).

        After the step the parameters' ``.grad`` hold the gradients of the lookahead point.
        If the closure or the inner step raises, the parameters are restored to ``theta_t``
        and the exception propagates.
        """
        if closure is None:
            raise ValueError(
                "Newt.step needs a closure that computes the loss and calls backward(), e.g. "
                "opt.step(lambda: (opt.zero_grad(), (l := loss_fn(model(x), y)).backward(), l)[2])."
            )
        closure = torch.enable_grad()(closure)
        params = [p for group in self.param_groups for p in group["params"]]
        rng_at_start = RngState(cuda_devices(params))

        loss = closure()
        f0 = _loss_tensor(loss, "first")
        active = [p for p in params if p.grad is not None]
        if not active:
            raise RuntimeError(
                "after the closure ran, no parameter has a gradient: the closure must call "
                "loss.backward() before returning the loss."
            )
        _check_dense(active)
        snapshot = self._snapshot_of(active)
        alpha = self._reference_lr()
        try:
            grads = [p.grad for p in active]
            self.inner.step()
            d0 = _kernels.step_dot(grads, snapshot, active, foreach=self.foreach)
            del grads
            for p in active:  # the lookahead's gradient must not accumulate onto the first one
                p.grad = None
            with replayed_rng(rng_at_start), frozen_module_buffers():
                f1 = _loss_tensor(closure(), "second (lookahead)")
            grads = [p.grad for p in active]
            if all(g is None for g in grads):
                raise RuntimeError(
                    "the lookahead closure call produced no gradient: the closure must call "
                    "loss.backward() every time it is called."
                )
            d1 = _kernels.step_dot(grads, snapshot, active, foreach=self.foreach)
            device = d1.device
            measured = torch.stack([f0.to(device), f1.to(device), d0.to(device), d1]).tolist()
        except BaseException:
            _kernels.copy_(active, snapshot, foreach=self.foreach)
            raise

        f0_, f1_, d0_, d1_ = measured
        proposal = self._rule(alpha, f0_, f1_, d0_, d1_, self.options)
        self._set_reference_lr(alpha, proposal.alpha)
        self.step_info = StepInfo(f0_, f1_, d0_, d1_, alpha, proposal.alpha, Decision(proposal.decision))
        self._steps += 1
        return loss

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
        return self._reference_lr()

    def _reference_lr(self) -> float:
        return max(float(group["lr"]) for group in self.param_groups)

    def _set_reference_lr(self, old: float, new: float) -> None:
        """Scale every group's rate by ``new / old``; the reference groups get ``new`` exactly."""
        factor = new / old
        for group in self.param_groups:
            lr = group["lr"]
            value = new if float(lr) == old else float(lr) * factor
            if isinstance(lr, torch.Tensor):
                lr.fill_(value)
            else:
                group["lr"] = value

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

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus Newt's own counters under ``"newt"``.

        The learning rates (the adapted rate included) are in ``param_groups``, as usual.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.inner.state_dict()
        state_dict["newt"] = {"steps": self._steps}
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
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        name = self.strategy if isinstance(self.strategy, str) else getattr(self.strategy, "__name__", "custom")
        return f"Newt(strategy={name!r}, options={self.options}, inner={self.inner!r})"


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


def _resolve_strategy(strategy: object) -> Rule:
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}; valid names are {', '.join(map(repr, STRATEGIES))}, "
                "or pass a callable rule(alpha, f0, f1, d0, d1, options)."
            )
        return STRATEGIES[strategy]
    if callable(strategy):
        return guard_custom_rule(strategy)
    raise TypeError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))} or a callable, got {strategy!r}.")


def _loss_tensor(loss: object, which: str) -> torch.Tensor:
    """The closure's loss as a detached float64 scalar tensor (no host sync)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(
                f"the {which} closure call returned a tensor of shape {tuple(loss.shape)}; it must "
                "return the scalar loss (reduce it, e.g. with .mean())."
            )
        return loss.detach().reshape(()).to(torch.float64)
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return torch.tensor(float(loss), dtype=torch.float64)
    raise TypeError(
        f"the {which} closure call returned {type(loss).__name__}; it must return the loss as a "
        "scalar tensor or a number (did you forget 'return loss'?)."
    )


def _check_dense(params: list[torch.Tensor]) -> None:
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError(
            "Newt does not support sparse gradients (e.g. nn.Embedding(sparse=True)): use dense "
            "gradients (sparse=False)."
        )

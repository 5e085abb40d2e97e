"""Every option of :class:`newt.Newt`: one range table, and the two objects that group them.

A user normally sets nothing but ``strategy`` (and perhaps ``update_every``). The rest falls in
two groups, each a frozen, validated dataclass:

- :class:`RuleOptions`: the update rules' hyperparameters (damping, smoothing, the rate's bounds
  and per-step factor, the division guard, the shrink factor after a fault);
- :class:`Policies`: the checks around the rule (the loss-spike test, the start-up test, the
  blow-up and rise checks, the hold on uphill steps, the noise correction, the rejection of
  non-finite steps); :meth:`Policies.off` turns every one of them off.

``Newt`` also takes every field of both by its own name (``Newt(inner, spike_threshold=0.5)``).
Whatever the way in, each value is checked against :data:`OPTIONS`, the one table that says
which values each option accepts.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch

from newt._numerics import check_real

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_POLICIES",
    "OPTIONS",
    "OptionSpec",
    "Policies",
    "RuleOptions",
    "check_group",
    "check_group_lr",
    "check_initial_rate",
    "check_inner",
    "check_option",
    "merged",
]


class OptionSpec(NamedTuple):
    """Which values one option accepts.

    ``kind`` is ``"real"`` (a number in the interval ``low``..``high``, each end open or
    closed), ``"flag"`` (True or False) or ``"count"`` (an integer >= ``low``); ``hint`` ends
    the error message with what the option means and a typical value.
    """

    kind: str
    hint: str
    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False


def _real(low: float, high: float, low_open: bool, high_open: bool, hint: str) -> OptionSpec:
    return OptionSpec("real", hint, low, high, low_open, high_open)


def _threshold(meaning: str) -> OptionSpec:
    """A relative loss rise that triggers a check: in (0, inf], where ``math.inf`` turns it off."""
    return _real(0, math.inf, True, False, f"{meaning} (math.inf: off).")


OPTIONS: Mapping[str, OptionSpec] = {
    # RuleOptions
    "gamma": _real(0, 1, True, False, "gamma is the Newton damping: use 1 for full steps, e.g. 0.5 to damp."),
    "smoothing": _real(0, 1, False, True, "smoothing is GeN's moving-average coefficient: 0 for none, e.g. 0.9."),
    "alpha_min": _real(0, math.inf, True, True, "alpha_min is the smallest learning rate allowed, e.g. 1e-10."),
    "alpha_max": _real(0, math.inf, True, True, "alpha_max is the largest learning rate allowed, e.g. 1e4."),
    "max_factor": _real(1, math.inf, True, True, "max_factor bounds each update's change, e.g. 2."),
    "eps": _real(0, 1, False, True, "eps is a relative tolerance, e.g. 1e-8."),
    "shrink": _real(0, 1, True, True, "shrink multiplies the rate after a NaN/inf or a loss spike, e.g. 0.1."),
    # Policies
    "spike_threshold": _threshold("spike_threshold is the relative loss rise that counts as a spike, e.g. 0.2"),
    "reject_spikes": OptionSpec("flag", "reject_spikes undoes a loss-spike step."),
    "blow_up_threshold": _threshold(
        "blow_up_threshold is the rise above the first loss counted as a blow-up, e.g. 0.5"
    ),
    "rise_threshold": _threshold(
        "rise_threshold is the rise above the largest recent loss that makes a plain step a lookahead step, e.g. 3"
    ),
    "start_armijo": _real(
        0,
        1,
        False,
        True,
        "start_armijo is the share of the predicted decrease a first step must achieve, e.g. 0.1 (0: off).",
    ),
    "hold_on_ascent": OptionSpec("flag", "hold_on_ascent keeps the rate after an uphill step."),
    "noise_correction": _real(
        0,
        1,
        False,
        False,
        "noise_correction caps the share of the slopes removed as mini-batch noise: 0 is off, e.g. 0.5.",
    ),
    "reject_nonfinite": OptionSpec(
        "flag", "reject_nonfinite undoes a step whose loss or gradients are NaN or infinite."
    ),
    # the structure of the step
    "update_every": OptionSpec(
        "count", "1 adapts the rate every step, e.g. 4 adapts it every fourth step.", low=1, high=math.inf
    ),
    "per_group": OptionSpec("flag", "per_group adapts each param group's rate on its own."),
    "forward_only": OptionSpec("flag", "forward_only skips the backward pass at the lookahead point."),
    "max_grad_norm": _real(
        0, math.inf, True, False, "max_grad_norm clips the gradients the inner step uses, e.g. 1.0 (None: no clipping)."
    ),
    "foreach": OptionSpec("flag", "foreach picks the multi-tensor kernels."),
}
"""Option name -> the values it accepts. Every option of ``Newt`` is checked against this table."""


def check_option(name: str, value: object) -> Any:
    """``value`` checked against ``OPTIONS[name]``: a float, a bool or an int; else a clear error.

    Raises:
        TypeError: The value has the wrong type (a bool where a number is wanted counts as one).
        ValueError: The value is out of the option's range.
    """
    spec = OPTIONS[name]
    if spec.kind == "flag":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}.")
        return value
    if spec.kind == "count":
        wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
        if wrong_type or value < spec.low:
            raise (TypeError if wrong_type else ValueError)(
                f"{name} must be an integer >= {spec.low:g}, got {value!r}: {spec.hint}"
            )
        return int(value)
    return check_real(
        name, value, low=spec.low, high=spec.high, low_open=spec.low_open, high_open=spec.high_open, hint=spec.hint
    )


def _check_fields(instance: object) -> None:
    """Validate and normalise every field of a frozen options dataclass in place."""
    for field in fields(instance):  # type: ignore[arg-type]
        object.__setattr__(instance, field.name, check_option(field.name, getattr(instance, field.name)))


@dataclass(frozen=True)
class RuleOptions:
    """Hyperparameters shared by the rules, validated on construction.

    Attributes:
        gamma: Newton damping of ``retsinas`` and ``taylor``, in (0, 1]. ``1`` takes the full
            Newton step; smaller values move only part of the way, which tames mini-batch noise.
        smoothing: Moving-average coefficient beta of ``gen``, in [0, 1): ``alpha_next =
            beta * alpha + (1 - beta) * parabola_minimiser``. ``0`` jumps to the minimiser.
        alpha_min: Smallest rate ever returned, > 0.
        alpha_max: Largest rate ever returned, > ``alpha_min``.
        max_factor: Each update's multiplicative change is clamped to
            ``[1 / max_factor, max_factor]``; > 1. The default 2 takes 14 updates from 1e-5 to
            1e-1; a larger cap lets one noisy mini-batch measurement throw the rate far off.
        eps: Relative guard of every division: a curvature denominator counts as positive only
            when it exceeds ``eps * (|d0| + |d1|)``; >= 0. The comparison is scale-free, so
            multiplying the loss by a constant never changes a decision.
        shrink: Factor, in (0, 1), applied to the rate when a measured number is NaN or
            infinite (usually the lookahead stepped into an overflow: the rate was too big),
            after a loss spike, and after a start that failed the start-up test.
    """

    gamma: float = 0.5
    smoothing: float = 0.9
    alpha_min: float = 1e-10
    alpha_max: float = 1e4
    max_factor: float = 2.0
    eps: float = 1e-8
    shrink: float = 0.1

    def __post_init__(self) -> None:
        _check_fields(self)
        if not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"alpha_min must be smaller than alpha_max, got alpha_min={self.alpha_min!r} "
                f"and alpha_max={self.alpha_max!r}. Swap them or widen the interval."
            )


@dataclass(frozen=True)
class Policies:
    """The checks ``Newt`` runs around the rule, each a threshold or a switch.

    Each mode runs the policies that apply to it (``newt.modes.MODES`` is the table); the
    mathematics of each is in ``docs/math.md``.

    Attributes:
        spike_threshold: A step whose lookahead loss exceeds the starting loss by more than
            this share of ``|f0|`` is a loss spike: the rate shrinks by ``shrink``. In (0, inf].
        reject_spikes: Undo a loss-spike step (the parameters go back to ``theta_t``).
        start_armijo: Until one step's loss falls by at least this share of the decrease its
            slope predicts (Armijo's condition), a step that falls short is undone and the rate
            shrinks. In [0, 1); 0 turns the start-up test off.
        blow_up_threshold: Closure-free mode given the loss, after the start: a batch loss above
            the first loss by more than this share of it undoes the step. In (0, inf].
        rise_threshold: Lazy mode: a plain step whose loss exceeds the largest of the last 8
            closure steps' losses by more than this many times it is measured like a lookahead
            step. In (0, inf].
        hold_on_ascent: Lookahead mode: keep the rate after a step whose direction rose on its
            own batch (``d0 < 0``), where the rules would lower it.
        noise_correction: The largest share of the lookahead's same-batch slopes removed as
            mini-batch noise, measured with the next batch's gradient. In [0, 1]; 0 is off.
        reject_nonfinite: Undo a step whose loss or gradients are NaN or infinite, so that no
            such number reaches the parameters (one host synchronisation before the inner step).
    """

    spike_threshold: float = 0.2
    reject_spikes: bool = True
    start_armijo: float = 0.1
    blow_up_threshold: float = 0.5
    rise_threshold: float = 3.0
    hold_on_ascent: bool = True
    noise_correction: float = 0.5
    reject_nonfinite: bool = True

    def __post_init__(self) -> None:
        _check_fields(self)

    @classmethod
    def off(cls) -> Policies:
        """Every policy off: ``Newt`` measures, adapts the rate with the rule, and does nothing else.

        With the rate also frozen, ``Newt(inner, policies=Policies.off())`` trains bit for bit
        like ``inner`` alone.
        """
        return cls(
            spike_threshold=math.inf,
            reject_spikes=False,
            start_armijo=0.0,
            blow_up_threshold=math.inf,
            rise_threshold=math.inf,
            hold_on_ascent=False,
            noise_correction=0.0,
            reject_nonfinite=False,
        )


DEFAULT_OPTIONS = RuleOptions()
DEFAULT_POLICIES = Policies()

_RULE_FIELDS = frozenset(f.name for f in fields(RuleOptions))
_POLICY_FIELDS = frozenset(f.name for f in fields(Policies))


def _checked_object(name: str, value: object, kind: type, example: str) -> object:
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{name} must be a newt.{kind.__name__}, got {type(value).__name__}, e.g. {example}.")
    return value


def merged(
    rule_options: RuleOptions | None, policies: Policies | None, overrides: Mapping[str, object]
) -> tuple[RuleOptions, Policies]:
    """The two option objects with ``overrides`` (options given by name to ``Newt``) applied.

    Raises:
        TypeError: An override names no option, or one object has the wrong type.
    """
    _checked_object("rule_options", rule_options, RuleOptions, "RuleOptions(gamma=1.0)")
    _checked_object("policies", policies, Policies, "Policies.off()")
    unknown = sorted(set(overrides) - _RULE_FIELDS - _POLICY_FIELDS)
    if unknown:
        names = ", ".join(sorted(_RULE_FIELDS | _POLICY_FIELDS))
        raise TypeError(f"Newt() got an unexpected keyword argument {unknown[0]!r}; the options by name are: {names}.")
    rule_options = replace(rule_options or DEFAULT_OPTIONS, **{k: v for k, v in overrides.items() if k in _RULE_FIELDS})
    policies = replace(policies or DEFAULT_POLICIES, **{k: v for k, v in overrides.items() if k in _POLICY_FIELDS})
    return rule_options, policies


def check_inner(inner: object, options: RuleOptions = DEFAULT_OPTIONS) -> None:
    """Refuse an inner optimizer ``Newt`` cannot wrap, saying why and what to do.

    Raises:
        TypeError: ``inner`` is not an optimizer, is a ``Newt``, or its ``step`` needs a closure.
        ValueError: A param group cannot be adapted (see :func:`check_group`), every group has
            ``lr=0``, or the largest initial rate is outside ``[alpha_min, alpha_max]``.
    """
    from newt.optimizer import Newt  # the optimizer module imports this one

    if isinstance(inner, Newt):
        raise TypeError("Newt cannot wrap another Newt: wrap the inner optimizer once.")
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"Newt wraps a torch.optim.Optimizer, got {type(inner).__name__}. Build the inner "
            "optimizer first, e.g. Newt(torch.optim.Adam(model.parameters(), lr=1e-3))."
        )
    closure = inspect.signature(type(inner).step).parameters.get("closure")
    if isinstance(inner, torch.optim.LBFGS) or (closure is not None and closure.default is inspect.Parameter.empty):
        raise TypeError(
            f"{type(inner).__name__}.step needs a closure: it searches along its direction itself, "
            "which is what Newt does around an optimizer that steps from the gradients alone. Wrap "
            "an optimizer such as SGD, Adam or AdamW, or use the closure-needing optimizer on its own."
        )
    for index, group in enumerate(inner.param_groups):
        check_group(group, index)
    largest = max(float(g["lr"]) for g in inner.param_groups)
    if largest <= 0.0:
        raise ValueError("every param group has lr=0: give at least one group a positive initial learning rate.")
    check_initial_rate(largest, options)


def check_initial_rate(lr: float, options: RuleOptions) -> None:
    """The largest initial rate must lie in ``[alpha_min, alpha_max]``: Newt keeps its rate there."""
    if not options.alpha_min <= lr <= options.alpha_max:
        raise ValueError(
            f"the largest initial learning rate is {lr!r}, outside [alpha_min, alpha_max] = "
            f"[{options.alpha_min!r}, {options.alpha_max!r}], where Newt keeps its rate: give the "
            "inner optimizer a rate inside it, or widen the bounds (rule_options or alpha_min=, alpha_max=)."
        )


def check_group(group: dict[str, Any], index: int) -> None:
    """A param group Newt can adapt: a usable ``"lr"``, not ``differentiable``, not ``maximize``."""
    check_group_lr(group, index)
    if group.get("differentiable", False):
        raise ValueError(
            f"param group {index} has differentiable=True: Newt steps under torch.no_grad() and "
            "cannot differentiate through the inner step. Build the inner optimizer with "
            "differentiable=False."
        )
    if group.get("maximize", False):
        raise ValueError(
            f"param group {index} has maximize=True: Newt's measurements and rules minimise the "
            "loss. Build the inner optimizer with maximize=False and let the closure return the "
            "negated objective."
        )


def check_group_lr(group: dict[str, Any], index: int) -> None:
    """A param group's ``"lr"`` must exist and be a finite number >= 0."""
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

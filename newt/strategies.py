"""Which rule a strategy applies, by what a step measures.

A strategy is a name or a callable; a step measures both loss values (lookahead and lazy modes),
or only the slopes (closure-free mode, per-group rates), or the slopes and the batch losses the
loop gives (closure-free mode given the loss). :func:`resolve` turns a strategy into the rule
for each case, once, at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from newt.rules import RULES, STRATEGIES, RuleSpec, gen, guard_custom_rule

__all__ = ["AUTO", "Strategy", "forward_only_rule", "measured_forward_only", "resolve"]

AUTO = "auto"
"""The default strategy: ``gen`` with a closure (lookahead and lazy modes), and closure-free
given the loss (``step(loss=...)`` or :meth:`newt.Newt.give_loss`) with the blow-up check on
(there ``gen``'s slope form, :func:`newt.rules.gen_slopes`); ``retsinas`` closure-free without
the loss, and with ``per_group=True`` and a closure (no per-group loss values). Why these:
``docs/benchmarks.md`` compares the rules in each mode."""


@dataclass(frozen=True)
class Strategy:
    """The rules one strategy applies.

    Attributes:
        name: The strategy's name (a custom rule's function name).
        with_losses: The rule of a step that measures ``f0`` and ``f1``.
        without_losses: The rule of a step that measures only the slopes; None when the
            strategy needs the loss values.
        given_loss: The rule of a closure-free step given its loss, with the blow-up check on.
        source: The strategy as the user gave it.
        gradient_lookahead: Where ``with_losses`` measures its lookahead forward only by default,
            the rule measured with the gradient: what a step uses on sharded (DTensor)
            parameters, whose all-gathered copies FSDP2 may keep until a backward pass.
    """

    name: str
    with_losses: RuleSpec
    without_losses: RuleSpec | None
    given_loss: RuleSpec | None
    source: str | Callable[..., Any] = AUTO
    gradient_lookahead: RuleSpec | None = None


def resolve(strategy: str | Callable[..., Any]) -> Strategy:
    """The rules of ``strategy``: ``"auto"``, a name of :data:`newt.rules.STRATEGIES`, or a callable.

    Raises:
        ValueError: An unknown name.
        TypeError: Neither a name nor a callable.
    """
    names = ", ".join(map(repr, (AUTO, *STRATEGIES)))
    if isinstance(strategy, str):
        if strategy == AUTO:
            return Strategy(AUTO, RULES["gen"], RULES["retsinas"], RULES["gen-slopes"], AUTO)
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}; valid names are {names}, "
                "or pass a callable rule(alpha, f0, f1, d0, d1, options)."
            )
        spec = RULES[strategy]
        loss_free = None if spec.loss_free is None else RULES[spec.loss_free]
        return Strategy(strategy, spec, loss_free, loss_free, strategy)
    if callable(strategy):
        name = getattr(strategy, "__name__", "custom")
        return Strategy(name, RuleSpec(name, guard_custom_rule(strategy)), None, None, strategy)
    raise TypeError(f"strategy must be one of {names} or a callable, got {strategy!r}.")


def forward_only_rule(spec: RuleSpec) -> RuleSpec:
    """``spec`` measured without a backward pass at the lookahead point (``forward_only=True``).

    ``gen`` reads no gradient there, and the strategies that measure their curvature otherwise
    (``gen-exact``, ``gen-three-point``) never run one. A step whose predicted change is below
    the losses' rounding then has no slope form to fall back on: where its losses did not move
    beyond rounding either, it measured nothing, and a descent grows the rate.

    Raises:
        ValueError: The rule reads the lookahead's gradient (``retsinas``, ``taylor``, a custom rule).
    """
    if spec.lookahead != "gradient":
        return spec
    if spec.rule is not gen:
        raise ValueError(
            f"forward_only=True skips the backward pass at the lookahead point, but strategy {spec.name!r} "
            "reads the gradient there (d1): use it with strategy='gen', 'gen-three-point' or 'gen-exact', "
            "or leave forward_only off."
        )
    return replace(spec, lookahead="loss", slope_form=None)


def measured_forward_only(strategy: Strategy, per_group: bool, forward_only: bool | None) -> Strategy:
    """``strategy`` with its closure steps' lookahead measured forward only, as ``forward_only`` says.

    None: wherever the rule reads no gradient at the lookahead point (``gen``, ``"auto"``; the
    GeN versions always). False: the lookahead's gradient is measured.

    Raises:
        ValueError: ``forward_only=True`` with ``per_group`` (each group's rate reads its own
            slope at the lookahead point), or with a rule that reads the gradient there;
            ``forward_only=False`` with ``gen-three-point`` or ``gen-exact``.
    """
    measures_elsewhere = strategy.with_losses.lookahead in ("three-point", "hessian")
    if forward_only is False and measures_elsewhere:
        raise ValueError(
            f"strategy {strategy.name!r} never measures the gradient at the lookahead point "
            "(it reads no slope there): leave forward_only unset."
        )
    if forward_only is None:
        if per_group or strategy.with_losses.rule is not gen:
            return strategy
        return replace(
            strategy, with_losses=forward_only_rule(strategy.with_losses), gradient_lookahead=strategy.with_losses
        )
    if not forward_only:
        return strategy
    if per_group:
        raise ValueError(
            "forward_only=True measures no gradient at the lookahead point, and per_group=True adapts "
            "each group from its own slope there: use one of the two."
        )
    return replace(strategy, with_losses=forward_only_rule(strategy.with_losses))

"""``Newt``'s own state: everything a step reads and changes besides the parameters and the
inner optimizer's state.

A step works on a copy (:meth:`State.copy`) and the optimizer keeps the copy once the step is
done. The copy is shallow: every field holds a value that a step replaces rather than changes
in place (numbers, tuples, frozen records), except the two containers that a step first copies
(the rates, the noise estimate). Which part of ``Newt`` owns which field, and writes it into
``state_dict()["newt"]``: the counters and rates (``Newt`` itself), ``start_proven``,
``recent_losses`` and ``loss_reference`` (:mod:`newt.policies`), ``noise`` and ``probe`` (the
noise correction, :mod:`newt.modes.lookahead`), ``deferred`` (:mod:`newt.modes.lazy`),
``pending`` and ``given_loss`` (:mod:`newt.modes.closure_free`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from newt._noise import NoiseEstimate
from newt._rates import Rates
from newt.step_info import StepInfo

__all__ = ["Deferred", "NoiseProbe", "Pending", "State"]


@dataclass(frozen=True)
class Pending:
    """Closure-free mode: the last step's ``<g, d>``, waiting for the next step's gradient.

    The snapshot buffer holds ``theta_{t-1}`` meanwhile, so ``d_{t-1} = snapshot - theta_t``.
    """

    params: tuple[torch.Tensor, ...]  # the parameters that moved, in order
    d0: torch.Tensor  # one entry per rate unit (one, or one per group)
    block_d0: torch.Tensor | None = None  # sums over the current block of update_every steps
    block_d1: torch.Tensor | None = None
    count: int = 0
    loss: float | None = None  # L_{t-1}(theta_{t-1}), given as step(loss=...), reduced across ranks


@dataclass(frozen=True)
class NoiseProbe:
    """A kept lookahead step's same-batch slopes, waiting for a fresh batch's gradient at its end.

    The snapshot buffer holds ``theta_t`` meanwhile, so ``d_t = snapshot - theta_{t+1}``. Once
    the next closure step has computed ``<grad L_fresh(theta_{t+1}), d_t>`` (``fresh``, still on
    the device and not reduced across ranks), the next lookahead step's reduction carries it.
    """

    params: tuple[torch.Tensor, ...]  # the parameters the step moved, in order
    keys: tuple[int, ...]  # the noise estimate's key per rate unit: the group, or -1 (global rate)
    d0: tuple[float, ...]
    d1: tuple[float, ...]
    fresh: torch.Tensor | None = None


@dataclass(frozen=True)
class Deferred:
    """Lazy mode: a rate increase held back from the plain steps until the next lookahead step."""

    groups: tuple[int, ...]  # the group each rate unit adapts
    alphas: tuple[float, ...]  # the adapted rates the lookahead step proposed


@dataclass
class State:
    """``Newt``'s state between two steps (see the module docstring for who owns which field)."""

    rates: Rates = field(default_factory=Rates)
    noise: NoiseEstimate = field(default_factory=lambda: NoiseEstimate(0.0))
    steps: int = 0
    rejected: int = 0
    start_proven: bool = False
    recent_losses: tuple[float, ...] = ()
    loss_reference: float | None = None
    probe: NoiseProbe | None = None
    deferred: Deferred | None = None
    pending: Pending | None = None
    given_loss: torch.Tensor | float | None = None
    info: StepInfo | None = None

    def copy(self) -> State:
        """The copy a step works on: shallow, with its own rates (a step changes them in place)."""
        other = object.__new__(State)
        other.__dict__.update(self.__dict__)
        other.rates = self.rates.copy()
        return other

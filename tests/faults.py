"""Seeded fault injection for training closures (used by ``tests/test_faults.py``).

A :func:`fault_schedule` decides, from its own ``random.Random(seed)`` (independent of the model,
the batches and torch's global RNG), at which training steps a fault is injected, which kind it
is and whether it hits the first closure call of the step (at ``theta_t``) or the second one (at
the lookahead point). :func:`faulty_closure` builds the usual zero_grad / forward / backward /
return-the-loss closure that misbehaves on the scheduled call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "FAULT_KINDS",
    "SPIKE_FACTOR",
    "Fault",
    "FaultyClosure",
    "InjectedFault",
    "fault_schedule",
    "faulty_closure",
]

FAULT_KINDS: tuple[str, ...] = ("spike", "nan_grad", "nan_loss", "raise")
"""``spike``: the loss (returned and backpropagated) is multiplied by :data:`SPIKE_FACTOR`;
``nan_grad``: after backward, a random slice of one parameter's gradient is NaN or inf (the loss
stays finite); ``nan_loss``: the loss is multiplied by NaN before backward, so the returned loss
and every gradient are NaN; ``raise``: :class:`InjectedFault` is raised after backward."""

SPIKE_FACTOR = {1: 10.0, 2: 1e4}
"""The loss multiplier of a spike, by closure call. A spiked lookahead loss is ``1e4 * L(theta_{t+1})``, far
above ``f0`` whatever the training stage. A spike at ``theta_t`` is only 10x: it inflates ``f0`` and the gradient
the inner step uses, so Newt cannot tell it from a genuinely steep batch (see tests/test_faults.py)."""


class InjectedFault(Exception):
    """Raised by a faulty closure; nothing else in the tests raises it, so catching it is exact."""


@dataclass(frozen=True)
class Fault:
    """One scheduled fault.

    Attributes:
        kind: One of :data:`FAULT_KINDS`.
        call: ``1``: the first closure call of the step (at ``theta_t``); ``2``: the second one (at
            the lookahead point ``theta_{t+1}``).
    """

    kind: str
    call: int

    def __str__(self) -> str:
        return f"{self.kind}@call{self.call}"


def fault_schedule(steps: int, rate: float, kinds: Sequence[str], seed: int) -> dict[int, Fault]:
    """Map step index -> :class:`Fault` for ``round(rate * steps)`` random steps of ``steps``.

    The faulted steps are a random sample; the faults are balanced and then shuffled: the kinds
    take turns (so each kind is injected ``len(faults) // len(kinds)`` times or once more) and
    each kind alternates between call 1 and call 2. The step right after a fault is always clean,
    so what a fault leaves behind is observed on an ordinary step; step 0 is clean too, so the
    first step is a fault-free measurement.
    """
    unknown = set(kinds) - set(FAULT_KINDS)
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {list(kinds)}")
    count = round(rate * steps)
    if count > (steps - 1) // 2:
        raise ValueError(f"{count} faults do not fit in {steps} steps with a clean step after each")
    rng = random.Random(seed)
    # No two faulted steps adjacent: sample ``count`` sorted slots of ``1 .. steps - count - 1``
    # and shift the k-th by k, which leaves a gap of at least one step after each fault.
    slots = sorted(rng.sample(range(1, steps - count), count))
    positions = [slot + rank for rank, slot in enumerate(slots)]
    faults = [Fault(kinds[i % len(kinds)], 1 + (i // len(kinds)) % 2) for i in range(count)]
    rng.shuffle(faults)
    return dict(zip(positions, faults))


@dataclass
class FaultyClosure:
    """A training closure plus what it did; call it like a function.

    Attributes:
        calls: How many times it has been called.
        raised: The :class:`InjectedFault` it raised, if any (the very object, to check identity).
        returned: The losses it returned, one per completed call.
    """

    body: Callable[[], torch.Tensor]
    fault: Fault | None
    rng: random.Random
    params: list[nn.Parameter]
    spike_factor: dict[int, float] = field(default_factory=lambda: dict(SPIKE_FACTOR))
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    calls: int = 0
    raised: InjectedFault | None = None
    returned: list[torch.Tensor] = field(default_factory=list)
    inert: bool = False  # a nan_grad fault found no gradient to poison (a forward-only lookahead)

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        kind = self.fault.kind if self.fault is not None and self.fault.call == self.calls else None
        loss = self.body()
        if kind == "spike":
            loss = loss * self.spike_factor[self.calls]
        elif kind == "nan_loss":
            loss = loss * math.nan  # the returned loss and (through backward) every gradient are NaN
        (loss if self.scale is None else self.scale(loss)).backward()
        if kind == "nan_grad":
            self._poison_one_gradient()
        elif kind == "raise":
            self.raised = InjectedFault(f"injected fault in closure call {self.calls}")
            raise self.raised
        self.returned.append(loss)
        return loss

    def _poison_one_gradient(self) -> None:
        """Fill a random, non-empty slice of one random parameter's gradient with NaN or +-inf."""
        if not torch.is_grad_enabled():  # a forward-only call: its backward() computed nothing
            self.inert = True
            return
        p = self.rng.choice(self.params)
        flat = p.grad.view(-1)
        start = self.rng.randrange(flat.numel())
        stop = self.rng.randint(start + 1, flat.numel())
        flat[start:stop] = self.rng.choice((math.nan, math.inf, -math.inf))


def faulty_closure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    fault: Fault | None,
    rng: random.Random,
    spike_factor: dict[int, float] | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FaultyClosure:
    """The cross-entropy closure of ``model`` on ``(x, y)``, with ``fault`` injected (None: clean).

    ``rng`` picks which gradient entries a ``nan_grad`` fault poisons; it is the schedule's own
    generator, so torch's RNG is never touched. ``spike_factor`` overrides :data:`SPIKE_FACTOR`.
    ``scale`` (a ``GradScaler``'s ``scale``) is applied to the loss before ``backward()``; the
    closure still returns the unscaled loss.
    """

    def body() -> torch.Tensor:
        optimizer.zero_grad()
        return nn.functional.cross_entropy(model(x), y)

    return FaultyClosure(
        body=body,
        fault=fault,
        rng=rng,
        params=list(model.parameters()),
        spike_factor=dict(SPIKE_FACTOR if spike_factor is None else spike_factor),
        scale=scale,
    )

"""Newt on a CUDA device: the same numbers as on the CPU, and one host synchronisation per step.

Skipped without a GPU (CI has none). The other CUDA cases are device-parametrized tests in the
modules they belong to (the dropout replay, the fp16 GradScaler).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from newt import Newt
from tests.devices import needs_cuda
from tests.models import train_regression

pytestmark = needs_cuda

MODES = {
    "lookahead": ({}, True),
    "lazy K=3": ({"update_every": 3}, True),
    "closure-free": ({"strategy": "retsinas"}, False),
    "closure-free, blocks of 3": ({"strategy": "retsinas", "update_every": 3}, False),
}


def _regression(device: str, dtype: torch.dtype = torch.float64):
    """A small MLP regression on fixed data (the data and weights depend only on the seed)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator, dtype=dtype)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.5)
    return model.to(device), x.to(device), y.to(device)


def _train(device: str, options: dict, with_closure: bool, steps: int = 30) -> tuple[list[float], list[torch.Tensor]]:
    model, x, y = _regression(device)
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3), **options)
    rates = []

    def record_rate() -> None:
        rates.append(opt.param_groups[0]["lr"])

    train_regression(model, opt, [(x, y)] * steps, with_closure=with_closure, after_step=record_rate)
    return rates, [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("mode", MODES)
def test_cuda_takes_the_steps_the_cpu_takes(mode):
    """In float64 the two devices differ only by the order of their sums: same rates, same weights."""
    options, with_closure = MODES[mode]
    cpu_rates, cpu_params = _train("cpu", options, with_closure)
    cuda_rates, cuda_params = _train("cuda", options, with_closure)
    assert cpu_rates[-1] != 1e-3  # the rate did adapt
    assert cuda_rates == pytest.approx(cpu_rates, rel=1e-9)
    for a, b in zip(cpu_params, cuda_params):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def _syncs_per_step(options: dict, with_closure: bool, steps: int = 6) -> list[int]:
    """Host synchronisations inside each ``opt.step`` (the closure and backward counted out)."""
    model, x, y = _regression("cuda", torch.float32)
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3), **options)
    in_closure = [False]

    def closure() -> torch.Tensor:
        in_closure[0] = True
        try:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        finally:
            in_closure[0] = False

    counts = []
    for _ in range(steps):
        if not with_closure:
            closure()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step(closure if with_closure else None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts


@pytest.mark.parametrize(
    ("options", "with_closure", "expected"),
    [
        # Without the non-finite check (reject_nonfinite=False):
        # the probation's first step, then lookahead steps: one .tolist() of the measurements
        ({"reject_nonfinite": False}, True, [1] * 6),
        # a lookahead step every third step; the plain steps read f0 for step_info
        ({"update_every": 3, "start_armijo": 0.0, "reject_nonfinite": False}, True, [1] * 6),
        # the first step only measures d0; then one reduction of the block sums per adaptation
        ({"strategy": "retsinas", "reject_nonfinite": False}, False, [0] + [1] * 5),
        ({"strategy": "retsinas", "update_every": 3, "reject_nonfinite": False}, False, [0, 0, 0, 1, 0, 0]),
        # the default reject_nonfinite=True checks theta_t's numbers before the inner step: one more
        ({}, True, [2] * 6),
    ],
    ids=["lookahead", "lazy", "closure-free", "closure-free blocks", "lookahead with the default check"],
)
def test_the_host_synchronisations_of_a_step(options, with_closure, expected):
    assert _syncs_per_step(options, with_closure) == expected

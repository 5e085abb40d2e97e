"""Newt's own gradient clipping (``max_grad_norm``): the inner step gets the clipped gradients, the
rule the unclipped ones, against closed forms on a quadratic in float64."""

from __future__ import annotations

import pytest
import torch

from newt import Newt, Policies
from tests.reference import random_quadratic


def _loss(a, b, x):
    return 0.5 * x @ a @ x - b @ x


def _closure(opt, a, b, x):
    def closure():
        opt.zero_grad()
        loss = _loss(a, b, x)
        loss.backward()
        return loss

    return closure


def _clipped(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s factor, written out."""
    return torch.clamp(max_norm / (g.norm() + 1e-6), max=1.0)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping bites; it does not
def test_the_inner_step_is_clipped_and_the_rule_measures_the_unclipped_gradient(max_norm):
    a, b, x = random_quadratic(3, 6)
    lr = 0.1
    opt = Newt(torch.optim.SGD([x], lr=lr), strategy="retsinas", max_grad_norm=max_norm, policies=Policies.off())
    x0 = x.detach().clone()
    g0 = a @ x0 - b
    d = lr * _clipped(g0, max_norm) * g0  # the clipped SGD step
    opt.step(_closure(opt, a, b, x))
    info = opt.step_info
    torch.testing.assert_close(x.detach(), x0 - d, rtol=1e-12, atol=1e-14)
    assert info.d0 == pytest.approx(float(g0 @ d), rel=1e-10)  # <unclipped gradient, step>
    assert info.d1 == pytest.approx(float((a @ (x0 - d) - b) @ d), rel=1e-10)
    assert (max_norm < 1.0) == (float(_clipped(g0, max_norm)) < 1.0)


def test_closure_free_steps_measure_the_unclipped_gradient_too():
    a, b, x = random_quadratic(4, 6)
    lr, max_norm = 0.1, 0.05
    opt = Newt(torch.optim.SGD([x], lr=lr), strategy="retsinas", max_grad_norm=max_norm)
    x0 = x.detach().clone()
    g0 = a @ x0 - b
    _closure(opt, a, b, x)()
    opt.step()
    d = x0 - x.detach()
    torch.testing.assert_close(d, lr * _clipped(g0, max_norm) * g0, rtol=1e-12, atol=1e-14)
    g1 = a @ x.detach() - b
    _closure(opt, a, b, x)()
    opt.step()  # measures the previous step: d0 with g0 unclipped, d1 with g1 unclipped
    assert opt.step_info.d0 == pytest.approx(float(g0 @ d), rel=1e-10)
    assert opt.step_info.d1 == pytest.approx(float(g1 @ d), rel=1e-10)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "1"])
def test_a_bad_max_grad_norm_is_refused(value):
    a, b, x = random_quadratic(0, 2)
    with pytest.raises((ValueError, TypeError), match="max_grad_norm"):
        Newt(torch.optim.SGD([x], lr=0.1), max_grad_norm=value)

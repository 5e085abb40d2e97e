"""The curvature study (``benchmarks/curvature.py``) against closed forms and torch's own HVP."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import curvature
from benchmarks.tasks import digits, digits_mlp


def _polynomial_line(c: float, b: float, h: float, t: float, q: float = 0.0) -> curvature.Line:
    """``g(a) = c - b a + h a^2/2 + t a^3/6 + q a^4/24``; the slope along ``w`` is ``-g'(a)``."""
    return curvature.Line(
        loss=lambda a: c - b * a + h * a**2 / 2 + t * a**3 / 6 + q * a**4 / 24,
        slope=lambda a: b - h * a - t * a**2 / 2 - q * a**3 / 6,
        curvature=h,
    )


@pytest.mark.parametrize("a", [1e-3, 0.1, 0.7, 2.0])
def test_on_a_quadratic_line_every_estimate_is_exact_and_every_rule_finds_the_minimiser(a):
    line = _polynomial_line(c=3.0, b=2.0, h=5.0, t=0.0)
    for value in curvature.estimates(line, a).values():
        assert value == pytest.approx(5.0, rel=1e-9)
    for value in curvature.minimisers(line, a).values():
        assert value == pytest.approx(2.0 / 5.0, rel=1e-9)


@pytest.mark.parametrize("a", [1e-2, 0.3, 1.0])
def test_on_a_cubic_line_the_two_point_errors_are_linear_in_a_and_the_three_point_fit_exact(a):
    h, t = 5.0, 3.0
    found = curvature.estimates(_polynomial_line(c=1.0, b=2.0, h=h, t=t), a)
    assert found["retsinas"] == pytest.approx(h + t * a / 2, rel=1e-9)
    assert found["taylor"] == pytest.approx(h + 2 * t * a / 3, rel=1e-9)
    assert found["gen two-point"] == pytest.approx(h + t * a / 3, rel=1e-9)
    assert found["three-point"] == pytest.approx(h, rel=1e-9)
    quartic = curvature.estimates(_polynomial_line(c=1.0, b=2.0, h=h, t=t, q=4.0), a)
    assert quartic["three-point"] == pytest.approx(h + 4.0 * a**2 / 12, rel=1e-9)


def test_the_hessian_along_a_direction_is_torchs_hessian_vector_product_on_a_real_model():
    torch.manual_seed(0)
    model = digits_mlp(0).double()
    x_train, y_train, _, _ = digits()
    x, y = x_train[:64].double(), y_train[:64]
    params = list(model.parameters())
    w = [torch.randn_like(p) for p in params]

    def loss_of(*values):
        out = torch.func.functional_call(model, {n: v for (n, _), v in zip(model.named_parameters(), values)}, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    _, hw = torch.autograd.functional.hvp(loss_of, tuple(p.detach() for p in params), tuple(w))
    expected = float(sum((h * v).sum() for h, v in zip(hw, w)))
    found = curvature.hessian_along(lambda: torch.nn.functional.cross_entropy(model(x), y), params, w)
    assert found == pytest.approx(expected, rel=1e-10)


def test_adams_direction_is_the_step_it_would_take_per_unit_of_rate_and_nothing_moves():
    torch.manual_seed(0)
    model = digits_mlp(0).double()
    x_train, y_train, _, _ = digits()
    x, y = x_train[:64].double(), y_train[:64]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y)

    for _ in range(3):  # some state in the moments
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    w = curvature.adam_direction(model, optimizer, loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"] and after["state"].keys() == state["state"].keys()
    for key, entry in state["state"].items():
        assert all(torch.equal(after["state"][key][name], value) for name, value in entry.items())
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_optimizer.load_state_dict(state)
    twin_optimizer.zero_grad()
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    twin_optimizer.step()
    for v, b, p in zip(w, before, twin.parameters()):
        torch.testing.assert_close(v, (b - p.detach()) / 1e-2, rtol=1e-9, atol=1e-12)

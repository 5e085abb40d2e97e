"""GeN's versions (docs/math.md, "What a step measures"): the exact one, the three-point fit, and
the forward-only lookahead of ``gen``.

The pure rules are checked like the others (exact on quadratic lines, invariant to the loss's
offset and scale, guarded, clamped); through ``Newt``, each strategy's measurement is checked
against an independent computation: the curvature against ``torch.autograd.functional.hvp``, the
three-point loss against the model evaluated at ``theta_t + d``, the backward passes counted.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import newt
from newt.rules import RULES, Decision, RuleOptions, gen_exact, gen_three_point
from newt.strategies import forward_only_rule
from tests.test_rules import any_float, in_bounds, options_and_alpha, quadratic_lines, undamped_wide

# --------------------------------------------------------------------------------------------
# The pure rules
# --------------------------------------------------------------------------------------------


def _back(q) -> float:
    """``g(-alpha)`` on the quadratic line ``g(a) = c - b a + h a^2 / 2``."""
    return q.c + q.b * q.alpha + q.h * q.alpha**2 / 2.0


@given(quadratic_lines())
def test_gen_exact_is_the_line_minimiser_on_a_quadratic(q):
    curvature = q.h * q.alpha**2  # d^T H d for the step d = alpha w
    out = gen_exact(q.alpha, q.alpha * q.b, curvature, undamped_wide())
    assert out.decision is Decision.NEWTON
    assert out.alpha == pytest.approx(q.minimiser, rel=1e-9)


@given(quadratic_lines())
def test_gen_three_point_is_the_line_minimiser_on_a_quadratic(q):
    f0, f1, _, _ = q.measurements()
    out = gen_three_point(q.alpha, f0, f1, _back(q), undamped_wide())
    assert out.decision is Decision.NEWTON
    assert out.alpha == pytest.approx(q.minimiser, rel=1e-6)


@given(quadratic_lines(), st.floats(-100.0, 100.0), st.sampled_from([2.0**-20, 0.5, 3.0, 2.0**20]))
def test_gen_three_point_ignores_the_losses_offset_and_scale(q, offset, scale):
    # an offset of up to 100 times the loss changes along the step (beyond, float64 cancels them)
    offset *= max(q.b * q.alpha, q.h * q.alpha**2)
    f0, f1, _, _ = q.measurements()
    options = RuleOptions()
    plain = gen_three_point(q.alpha, f0, f1, _back(q), options)
    moved = gen_three_point(q.alpha, scale * (f0 + offset), scale * (f1 + offset), scale * (_back(q) + offset), options)
    assert moved.decision == plain.decision
    assert moved.alpha == pytest.approx(plain.alpha, rel=1e-6)


@given(quadratic_lines(), st.sampled_from([2.0**-20, 0.5, 3.0, 2.0**20]))
def test_gen_exact_ignores_the_losses_scale(q, scale):
    options = RuleOptions()
    plain = gen_exact(q.alpha, q.alpha * q.b, q.h * q.alpha**2, options)
    scaled = gen_exact(q.alpha, scale * q.alpha * q.b, scale * q.h * q.alpha**2, options)
    assert scaled.decision == plain.decision
    assert scaled.alpha == pytest.approx(plain.alpha, rel=1e-12)


def test_gen_exact_keeps_the_rate_where_the_curvature_is_not_positive():
    options = RuleOptions()
    for curvature in (0.0, -1.0, 1e-30):
        assert gen_exact(0.1, 1.0, curvature, options) == (0.1, Decision.NONCONVEX)


def test_gen_three_point_keeps_the_rate_on_a_concave_or_flat_fit():
    options = RuleOptions()
    assert gen_three_point(0.1, 1.0, 0.5, 1.2, options) == (0.1, Decision.NONCONVEX)  # 1.2 - 2 + 0.5 < 0
    assert gen_three_point(0.1, 1.0, 0.5, 1.5, options) == (0.1, Decision.NONCONVEX)  # a straight line


def test_the_two_rules_by_hand():
    # smoothing 0.9: 0.9 alpha + 0.1 delta
    options = RuleOptions(smoothing=0.9, max_factor=10.0)
    # delta = alpha d0 / C = 0.1 * 2 / 0.5 = 0.4
    assert gen_exact(0.1, 2.0, 0.5, options).alpha == pytest.approx(0.9 * 0.1 + 0.1 * 0.4)
    # delta = (alpha / 2)(f_back - f1) / (f_back - 2 f0 + f1) = 0.05 * 1.5 / 0.5 = 0.15
    assert gen_three_point(0.1, 1.0, 0.5, 2.0, options).alpha == pytest.approx(0.9 * 0.1 + 0.1 * 0.15)


@given(options_and_alpha(), any_float, any_float, any_float)
def test_the_two_rules_always_return_a_rate_in_bounds(oa, x, y, z):
    options, alpha = oa
    assert in_bounds(gen_exact(alpha, x, y, options).alpha, options)
    assert in_bounds(gen_three_point(alpha, x, y, z, options).alpha, options)


@given(quadratic_lines())
def test_the_table_entries_read_the_curvature_from_d1_as_d0_minus_c(q):
    """The pipeline passes a step that measured its curvature C as ``d1 = d0 - C``."""
    f0, f1, d0, _ = q.measurements()
    options = undamped_wide()
    exact_c = q.h * q.alpha**2
    assert RULES["gen-exact"].rule(q.alpha, f0, f1, d0, d0 - exact_c, options) == gen_exact(
        q.alpha, d0, exact_c, options
    )
    three_c = _back(q) - 2.0 * f0 + f1
    table = RULES["gen-three-point"].rule(q.alpha, f0, f1, d0, d0 - three_c, options)
    assert table.alpha == pytest.approx(gen_three_point(q.alpha, f0, f1, _back(q), options).alpha, rel=1e-9)


def test_the_strategies_are_available_by_name():
    assert newt.STRATEGIES["gen-exact"] is RULES["gen-exact"].rule
    assert newt.STRATEGIES["gen-three-point"] is RULES["gen-three-point"].rule
    assert RULES["gen"].lookahead == "gradient" and forward_only_rule(RULES["gen"]).lookahead == "loss"
    assert RULES["gen-exact"].lookahead == "hessian" and RULES["gen-three-point"].lookahead == "three-point"


# --------------------------------------------------------------------------------------------
# Through Newt
# --------------------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    return model, torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))


def _closure(model, x, y, optimizer, counter: list[int] | None = None):
    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if counter is not None:
        for p in model.parameters():
            p.register_hook(lambda g: counter.__setitem__(0, counter[0] + 1) or g)
    return closure


def _flat_loss(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(flat):
        chunks = torch.split(flat, sizes)
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return loss_of


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_gen_exact_measures_the_curvature_of_torchs_hessian_vector_product(inner):
    model, x, y = _mlp()
    make = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[inner]
    opt = newt.Newt(make(model.parameters(), lr=0.05), "gen-exact", start_armijo=0.0)
    closure = _closure(model, x, y, opt)
    loss_of = _flat_loss(model, x, y)
    for _ in range(4):
        start = _flat(model.parameters())
        opt.step(closure)
        info = opt.step_info
        assert not info.rejected
        step = start - _flat(model.parameters())
        _, hv = torch.autograd.functional.hvp(loss_of, start, step)
        exact = float(step @ hv)
        assert info.d0 - info.d1 == pytest.approx(exact, rel=1e-6)  # d1 = d0 - d^T H d
        # and the rate is gen_exact's on those numbers, less the share of d0 taken as noise
        expected = gen_exact(info.alpha, info.d0 * (1.0 - info.noise), info.d0 - info.d1, opt.options)
        assert info.alpha_next == pytest.approx(expected.alpha, rel=1e-12)


def test_gen_three_point_measures_the_loss_behind_the_start_and_lands_on_the_inner_step():
    model, x, y = _mlp()
    twin, _, _ = _mlp()
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.05), "gen-three-point", start_armijo=0.0)
    plain = torch.optim.Adam(twin.parameters(), lr=0.05)
    closure = _closure(model, x, y, opt)
    loss_of = _flat_loss(model, x, y)
    start = _flat(model.parameters())
    opt.step(closure)
    plain.zero_grad()
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    plain.step()
    # the parameters are exactly where Adam's own step put them: the visit behind left no trace
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    end = _flat(model.parameters())
    info = opt.step_info
    f_back = float(loss_of(2.0 * start - end))
    curvature = f_back - 2.0 * info.f0 + info.f1
    assert info.d0 - info.d1 == pytest.approx(curvature, rel=1e-9)
    assert info.f1 == pytest.approx(float(loss_of(end)), rel=1e-12)


@pytest.mark.parametrize(
    ("strategy", "forward", "backwards"),
    [("gen", True, 1), ("auto", None, 1), ("gen-three-point", None, 1), ("gen", False, 2), ("taylor", None, 2)],
)
def test_a_forward_only_lookahead_runs_no_backward_there(strategy, forward, backwards):
    model, x, y = _mlp()
    counter = [0]
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy, forward_only=forward)
    closure = _closure(model, x, y, opt, counter)
    n_params = len(list(model.parameters()))
    for _ in range(3):
        counter[0] = 0
        opt.step(closure)
        assert counter[0] == backwards * n_params  # one gradient per parameter per backward pass


def test_after_a_forward_only_step_the_gradients_are_those_of_the_start():
    model, x, y = _mlp()
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), "gen", forward_only=True)
    start = _flat(model.parameters())
    opt.step(_closure(model, x, y, opt))
    gradient = torch.autograd.functional.jacobian(_flat_loss(model, x, y), start)
    assert torch.allclose(_flat(p.grad for p in model.parameters()), gradient, rtol=1e-12, atol=1e-15)


def test_the_interception_ends_with_the_step_and_stays_in_its_thread():
    model, x, y = _mlp()
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), "gen", forward_only=True)
    other = torch.ones(3, dtype=torch.float64, requires_grad=True)
    seen: dict[str, object] = {}

    def elsewhere():
        (other * 2.0).sum().backward()  # another thread's backward, during the lookahead call
        seen["grad"] = other.grad

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if not torch.is_grad_enabled():  # the forward-only lookahead call
            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(seen["grad"], torch.full((3,), 2.0, dtype=torch.float64))
    assert not torch.overrides._get_current_function_mode_stack()
    # and a backward after the step runs as usual
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_interception_ends_when_the_closure_raises():
    model, x, y = _mlp()
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), "gen", forward_only=True)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if calls[0] == 2:
            raise KeyError("boom")
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError):
        opt.step(closure)
    assert not torch.overrides._get_current_function_mode_stack()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("strategy", ["gen-exact", "gen-three-point"])
def test_the_extra_calls_leave_batchnorm_statistics_as_the_first_call_left_them(strategy):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    ).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy, start_armijo=0.0)
    opt.step(_closure(model, x, y, opt))
    reference(x)  # the one forward the statistics may have seen
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(reference[1], name)), name


def test_gen_exact_works_with_lazy_updates():
    model, x, y = _mlp()
    opt = newt.Newt(
        torch.optim.Adam(model.parameters(), lr=0.01), "gen-exact", update_every=3, start_armijo=0.0
    )
    inner = _closure(model, x, y, opt)
    calls = [0]

    def closure():
        calls[0] += 1
        return inner()

    decisions, calls_per_step = [], []
    for _ in range(9):
        before = calls[0]
        opt.step(closure)
        decisions.append(opt.step_info.decision)
        calls_per_step.append(calls[0] - before)
    # every third step measures (three calls: theta_t, the lookahead, the curvature at theta_t)
    assert calls_per_step == [3, 1, 1] * 3
    assert [d is Decision.PLAIN for d in decisions] == [False, True, True] * 3
    assert math.isfinite(opt.alpha)


@pytest.mark.parametrize("strategy", ["gen-exact", "gen-three-point"])
def test_the_new_strategies_need_a_closure_and_one_rate(strategy):
    model, x, y = _mlp()
    with pytest.raises(ValueError, match="per_group"):
        newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy, per_group=True)
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_forward_only_refuses_a_rule_that_reads_the_lookahead_gradient():
    model, _, _ = _mlp()
    for strategy in ("taylor", "retsinas", lambda alpha, f0, f1, d0, d1, options: alpha):
        with pytest.raises(ValueError, match="forward_only"):
            newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy, forward_only=True)
    with pytest.raises(ValueError, match="per_group"):
        newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), "gen", forward_only=True, per_group=True)


@pytest.mark.parametrize("strategy", ["gen-exact", "gen-three-point"])
def test_forward_only_false_is_refused_where_no_gradient_is_read_at_the_lookahead(strategy):
    model, _, _ = _mlp()
    with pytest.raises(ValueError, match="leave forward_only unset"):
        newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy, forward_only=False)


@pytest.mark.parametrize("strategy", ["gen", "gen-exact", "gen-three-point"])
def test_a_rejected_step_of_each_version_ends_bit_for_bit_at_theta_t(strategy):
    model, x, y = _mlp()
    # far too large a first step: the start-up test undoes it
    opt = newt.Newt(torch.optim.SGD(model.parameters(), lr=50.0), strategy)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(model, x, y, opt))
    assert opt.step_info.rejected
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("strategy", ["gen", "gen-exact", "gen-three-point"])
def test_after_a_step_that_computes_no_lookahead_gradient_grad_is_theta_ts_even_if_zeroed_in_place(strategy):
    model, x, y = _mlp()
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy)
    start = _flat(model.parameters())

    def closure():
        opt.zero_grad(set_to_none=False)  # zeroes whatever .grad holds, in place
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    closure()  # every parameter has a .grad to zero
    opt.step(closure)
    gradient = torch.autograd.functional.jacobian(_flat_loss(model, x, y), start)
    assert torch.allclose(_flat(p.grad for p in model.parameters()), gradient, rtol=1e-12, atol=1e-15)


def test_gen_exact_says_what_to_change_when_the_closure_never_calls_backward():
    model, x, y = _mlp()
    opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), "gen-exact")
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if calls[0] == 1:
            loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("strategy", ["gen-exact", "gen-three-point"])
def test_a_grad_scaler_leaves_the_measured_curvature_unscaled(strategy):
    runs = []
    for scale in (None, 2.0**10):
        model, x, y = _mlp()
        model.float()
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
        opt = newt.Newt(torch.optim.Adam(model.parameters(), lr=0.01), strategy, grad_scaler=scaler)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x.float()), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        curvatures = []
        for _ in range(3):
            opt.step(closure)
            if scaler is not None:
                scaler.update()
            curvatures.append(opt.step_info.d0 - opt.step_info.d1)
        runs.append(curvatures)
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


@pytest.mark.parametrize("strategy", ["gen", "gen-three-point", "gen-exact"])
def test_on_a_quadratic_each_version_moves_the_rate_to_the_exact_line_minimiser(strategy):
    """SGD on ``x^T H x / 2 - b^T x``: along the step ``-g`` the line minimiser is ``g^T g / g^T H g``,
    computed here independently; undamped (smoothing 0) every version lands on it."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    h = a @ a.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = newt.Newt(torch.optim.SGD([x], lr=0.01), strategy, smoothing=0.0, start_armijo=0.0, max_factor=1e3)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ h @ x - b @ x
        loss.backward()
        return loss

    for _ in range(4):
        g = (h @ x - b).detach()
        opt.step(closure)
        assert opt.step_info.decision is Decision.NEWTON
        assert opt.step_info.alpha_next == pytest.approx(float(g @ g / (g @ h @ g)), rel=1e-9)


def test_gen_exact_on_an_operation_without_a_second_derivative_says_what_to_change():
    """torch's CPU flash attention has no double backward: the step raises, names the way out,
    and moves nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 16, 8)
    opt = newt.Newt(torch.optim.Adam(proj.parameters(), lr=0.01), "gen-exact")

    def closure():
        opt.zero_grad()
        q = proj(x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the kernel nn.TransformerEncoderLayer picks on the CPU
            loss = torch.nn.functional.scaled_dot_product_attention(q, q, q).pow(2).mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in proj.parameters()]
    with pytest.raises(RuntimeError, match="gen-three-point") as caught:
        opt.step(closure)
    assert "not implemented" in str(caught.value.__cause__)
    assert all(torch.equal(p, b) for p, b in zip(proj.parameters(), before))
    assert opt.step_info is None

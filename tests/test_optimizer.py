"""Behaviour of the stateful ``Newt`` optimizer, checked against independent computations."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from newt import Decision, Newt, Policies, StepInfo
from tests.devices import DEVICES
from tests.reference import random_quadratic, reference_measurements

WIDE = dict(alpha_min=1e-12, alpha_max=1e12, max_factor=1e9)


def _quadratic(seed: int, dim: int = 6):
    return random_quadratic(seed, dim)


def _quadratic_closure(opt, a, b, x):
    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("strategy", ["retsinas", "taylor", "gen"])
@pytest.mark.parametrize("seed", range(3))
def test_one_step_on_quadratic_sets_lr_to_exact_line_minimiser(strategy, seed):
    a, b, x = _quadratic(seed)
    g = (a @ x - b).detach()
    exact = float(g @ g / (g @ a @ g))
    opt = Newt(torch.optim.SGD([x], lr=0.3 * exact), strategy=strategy, gamma=1.0, smoothing=0.0, **WIDE)
    opt.step(_quadratic_closure(opt, a, b, x))
    assert opt.param_groups[0]["lr"] == pytest.approx(exact, rel=1e-8)
    assert opt.step_info.decision == Decision.NEWTON


def test_measured_numbers_match_per_parameter_reference_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 5), torch.randn(32, 3)

    def make_closure(net, opt):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss

        return closure

    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = Newt(inner, strategy="retsinas")
    twin_inner = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for _ in range(3):  # a few steps so Adam's moments are not trivial
        lr = twin_inner.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        expected = reference_measurements(list(twin.parameters()), twin_inner, make_closure(twin, twin_inner))
        loss = opt.step(make_closure(model, opt))
        info = opt.step_info
        assert info.alpha == lr
        assert float(loss.detach()) == info.f0
        for key in ("f0", "f1", "d0", "d1"):
            assert getattr(info, key) == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_curvature_measurement_matches_autograd_hessian_vector_product():
    # D0 - D1 = alpha^2 w^T H w + O(alpha^3): check it against torch.autograd's HVP at small alpha.
    torch.manual_seed(1)
    w_true = torch.randn(4, dtype=torch.float64)
    inputs = torch.randn(50, 4, dtype=torch.float64)
    targets = torch.sigmoid(inputs @ w_true)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)

    def loss_fn(t):
        return nn.functional.binary_cross_entropy(torch.sigmoid(inputs @ t), targets)

    grad = torch.autograd.grad(loss_fn(theta), theta)[0]
    _, hvp = torch.autograd.functional.hvp(loss_fn, theta.detach(), grad)
    alpha = 1e-4
    opt = Newt(torch.optim.SGD([theta], lr=alpha), strategy="retsinas")

    def closure():
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    opt.step(closure)
    info = opt.step_info
    assert info.d0 == pytest.approx(alpha * float(grad @ grad), rel=1e-12)
    assert info.d0 - info.d1 == pytest.approx(alpha**2 * float(grad @ hvp), rel=1e-3)


class _Net(nn.Module):
    """Dropout and BatchNorm: both would make a naive second closure call wrong."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, x):
        return self.body(x)


def _train(opt_factory, steps, seed=0, record=None):
    torch.manual_seed(seed)
    model = _Net()
    opt = opt_factory(model)
    data = torch.Generator().manual_seed(seed + 100)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=data)
        y = torch.randint(0, 2, (16,), generator=data)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if record is not None:
                record.append(loss.item())
            return loss

        losses.append(float(opt.step(closure).detach()))
    return model, opt, losses, torch.get_rng_state()


def _frozen_newt(inner_cls, lr, **kwargs):
    # gamma ~ 0 makes every proposal alpha * (1 + tiny) == alpha; alpha_max pins it from above.
    # A loss spike or a first step short of Armijo's condition is undone whatever gamma says:
    # every policy is off.
    return lambda model: Newt(
        inner_cls(model.parameters(), lr=lr, **kwargs),
        strategy="retsinas",
        policies=Policies.off(),
        gamma=1e-300,
        alpha_min=lr / 2,
        alpha_max=lr,
    )


@settings(max_examples=12, deadline=None)
@given(
    inner=st.sampled_from(
        [
            (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
            (torch.optim.Adam, {}),
            (torch.optim.AdamW, {"weight_decay": 0.1}),
            (torch.optim.RMSprop, {"momentum": 0.5}),
        ]
    ),
    lr=st.floats(1e-4, 1e-1),
    seed=st.integers(0, 2**16),
)
def test_newt_with_frozen_rate_matches_inner_optimizer_bit_for_bit(inner, lr, seed):
    inner_cls, kwargs = inner
    plain_model, _, plain_losses, plain_rng = _train(lambda m: inner_cls(m.parameters(), lr=lr, **kwargs), 5, seed)
    newt_model, newt_opt, newt_losses, newt_rng = _train(_frozen_newt(inner_cls, lr, **kwargs), 5, seed)
    assert newt_losses == plain_losses
    assert newt_opt.param_groups[0]["lr"] == lr
    for (name, a), b in zip(plain_model.state_dict().items(), newt_model.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm buffers alike
    assert torch.equal(newt_rng, plain_rng)  # the lookahead consumed no random numbers


@pytest.mark.parametrize("device", DEVICES)
def test_lookahead_sees_same_dropout_mask_and_leaves_rng_as_one_call_would(device):
    torch.manual_seed(0)
    p = nn.Parameter(torch.ones(100, device=device))
    opt = Newt(torch.optim.SGD([p], lr=1e-3))
    masks = []

    def closure():
        opt.zero_grad()
        mask = (torch.rand(100, device=device) > 0.5).double()
        masks.append(mask)
        loss = (p * mask).pow(2).sum()
        loss.backward()
        return loss

    torch.manual_seed(123)  # seeds the CPU and every CUDA generator
    opt.step(closure)
    after_newt = torch.rand(5, device=device)
    torch.manual_seed(123)
    torch.rand(100, device=device)  # exactly one closure's worth of draws
    after_one_call = torch.rand(5, device=device)
    assert len(masks) == 2
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(after_newt, after_one_call)


def test_lookahead_does_not_update_batchnorm_statistics_twice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3)
    opt = Newt(torch.optim.SGD(model.parameters(), lr=0.1))

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    twin(x)  # one training-mode forward at theta_t: what BatchNorm should have seen
    bn, twin_bn = model[1], twin[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, twin_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, twin_bn.running_var, rtol=0, atol=0)


def test_inner_optimizer_state_advances_once_per_step():
    model = nn.Linear(4, 1)
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3))
    x, y = torch.randn(10, 4), torch.randn(10, 1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    assert all(int(s["step"]) == 4 for s in opt.state.values())
    assert len(opt.state) == 2


def test_global_rate_keeps_ratio_between_param_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 1e-3}], lr=1.0
    )
    opt = Newt(inner)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(5):

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == opt.step_info.alpha_next == opt.alpha
        assert lrs[0] / lrs[1] == pytest.approx(10.0, rel=1e-12)
    assert lrs[0] != 1e-2  # the rate did adapt


def test_frozen_and_unused_parameters_are_skipped():
    torch.manual_seed(0)
    used = nn.Linear(3, 1)
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    unused = nn.Parameter(torch.randn(3))
    before = (frozen.clone(), unused.clone())
    opt = Newt(torch.optim.SGD([*used.parameters(), frozen, unused], lr=0.1, momentum=0.9))
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = used(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    assert torch.equal(frozen, before[0]) and torch.equal(unused, before[1])
    assert unused.grad is None and frozen.grad is None
    assert math.isfinite(opt.step_info.d0) and opt.step_info.d0 > 0


def test_is_a_real_optimizer_sharing_the_inner_groups_and_state():
    model = nn.Linear(2, 1)
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = Newt(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    model(torch.ones(1, 2)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 5e-4})
    assert inner.param_groups[-1]["params"] == [extra] and len(opt.param_groups) == 2
    assert "Newt(strategy='auto'" in repr(opt)  # the default strategy


def test_step_hooks_run_once_per_step_and_state_dict_hooks_run():
    model = nn.Linear(2, 1)
    opt = Newt(torch.optim.SGD(model.parameters(), lr=1e-2))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("loaded"))

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(3, 2)).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert calls == ["pre", "post"]
    sd = opt.state_dict()
    assert sd["tag"] == 1
    opt.load_state_dict(sd)
    assert calls[-1] == "loaded"


def _digits_like(seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 2, (16,), generator=gen)) for _ in range(10)]


@pytest.mark.parametrize("strategy", ["retsinas", "taylor", "gen"])
def test_checkpoint_round_trip_resumes_bit_identically(strategy):
    batches = _digits_like(0)

    def build():
        torch.manual_seed(0)
        model = _Net()
        return model, Newt(torch.optim.Adam(model.parameters(), lr=1e-3), strategy=strategy)

    def run(model, opt, chunk):
        for x, y in chunk:

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)

    torch.manual_seed(5)
    model, opt = build()
    run(model, opt, batches)
    straight = copy.deepcopy(model.state_dict()), opt.param_groups[0]["lr"]

    torch.manual_seed(5)
    model, opt = build()
    run(model, opt, batches[:6])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    assert opt.state_dict()["newt"]["steps"] == 6
    run(model, opt, batches[6:])
    assert opt.param_groups[0]["lr"] == straight[1]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, straight[0][name]), name


def test_failed_lookahead_restores_parameters_and_next_step_works():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = Newt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x = torch.randn(4, 3)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("data loader hiccup")
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError, match="hiccup"):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    opt.step(closure)
    assert isinstance(opt.step_info, StepInfo)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    ("returned", "match"),
    [(None, "returned NoneType"), (torch.ones(3), "shape \\(3,\\)"), ("loss", "returned str")],
)
def test_closure_returning_something_other_than_a_scalar_is_rejected(returned, match):
    p = nn.Parameter(torch.ones(2))
    opt = Newt(torch.optim.SGD([p], lr=0.1))

    def closure():
        opt.zero_grad()
        p.sum().backward()
        return returned

    with pytest.raises(TypeError, match=match):
        opt.step(closure)


def test_closure_that_never_calls_backward_is_rejected():
    p = nn.Parameter(torch.ones(2))
    opt = Newt(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(RuntimeError, match="must call loss.backward"):
        opt.step(lambda: p.sum())


def test_step_without_closure_is_rejected_by_a_rule_that_reads_the_losses():
    opt = Newt(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), strategy="taylor")
    with pytest.raises(ValueError, match="without a closure, but strategy 'taylor' .* needs one: pass a closure"):
        opt.step()


def _with_lr(inner, lr):
    inner.param_groups[0]["lr"] = lr  # what a buggy scheduler or hand edit could leave behind
    return inner


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda p: Newt([p]), TypeError, "wraps a torch.optim.Optimizer"),
        (lambda p: Newt(Newt(torch.optim.SGD([p], lr=0.1))), TypeError, "another Newt"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), strategy="newton"), ValueError, "'retsinas', 'taylor', 'gen'"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), strategy=3), TypeError, "callable"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), gamma=0.0), ValueError, "gamma"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), gamma="big"), TypeError, "gamma"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), smoothing=1.0), ValueError, "smoothing"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), alpha_min=1.0, alpha_max=0.1), ValueError, "alpha_min"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), max_factor=1.0), ValueError, "max_factor"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), eps=-1.0), ValueError, "eps"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), gamma=1.5), ValueError, r"gamma must be in \(0, 1\]"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), smoothing=None), TypeError, "smoothing must be a real number"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), smoothing=-0.1), ValueError, r"smoothing must be in \[0, 1\)"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), alpha_min=0.0), ValueError, "alpha_min must be in"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), alpha_max="1e4"), TypeError, "alpha_max must be a real number"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), alpha_max=math.inf), ValueError, "alpha_max must be in"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), max_factor=[2]), TypeError, "max_factor must be a real number"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), max_factor=math.nan), ValueError, "max_factor must be in"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), eps=1.0), ValueError, r"eps must be in \[0, 1\)"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), eps=True), TypeError, "eps must be a real number"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), shrink=1.0), ValueError, r"shrink must be in \(0, 1\)"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), spike_threshold=0.0), ValueError, "spike_threshold must be in"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), spike_threshold="x"), TypeError, "spike_threshold must be a"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), reject_spikes=1), TypeError, "reject_spikes must be True"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), blow_up_threshold=-1.0), ValueError, "blow_up_threshold must be"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), blow_up_threshold="2"), TypeError, "blow_up_threshold must be a"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), rise_threshold=0.0), ValueError, "rise_threshold must be"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), rise_threshold="3"), TypeError, "rise_threshold must be a"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), hold_on_ascent="yes"), TypeError, "hold_on_ascent must be True"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), start_armijo=1.0), ValueError, r"start_armijo must be in \[0, 1"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), start_armijo=None), TypeError, "start_armijo must be a real"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), reject_nonfinite="yes"), TypeError, "reject_nonfinite must be"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1), foreach=None), TypeError, "foreach must be True or False"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.0)), ValueError, "positive initial learning rate"),
        (lambda p: Newt(torch.optim.SGD([p], lr=0.1, differentiable=True)), ValueError, "differentiable"),
        (lambda p: Newt(_with_lr(torch.optim.SGD([p], lr=0.1), float("nan"))), ValueError, "finite number"),
        (lambda p: Newt(_with_lr(torch.optim.SGD([p], lr=0.1), "fast")), ValueError, "finite number"),
    ],
)
def test_bad_construction_raises_a_clear_error(build, error, match):
    with pytest.raises(error, match=match):
        build(nn.Parameter(torch.ones(2)))


def test_inner_optimizer_without_lr_is_rejected():
    class NoRate(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"rho": 0.9})

    with pytest.raises(ValueError, match="has no 'lr'"):
        Newt(NoRate([nn.Parameter(torch.ones(2))]))


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = Newt(torch.optim.SGD(emb.parameters(), lr=0.1))

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(closure)


def test_custom_strategy_is_called_and_clamped():
    seen = []

    def halve(alpha, f0, f1, d0, d1, options):
        seen.append((alpha, f0, f1, d0, d1))
        return alpha * 1e-6  # below the factor clamp: Newt must clamp it

    p = nn.Parameter(torch.ones(2))
    opt = Newt(torch.optim.SGD([p], lr=0.1), strategy=halve, max_factor=4.0)

    def closure():
        opt.zero_grad()
        loss = p.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(seen) == 1 and seen[0][0] == 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 4.0)
    assert opt.step_info.decision == Decision.CLAMPED


def test_tensor_learning_rate_is_updated_in_place():
    p = nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.01)
    opt = Newt(torch.optim.Adam([p], lr=lr))

    def closure():
        opt.zero_grad()
        loss = (p - 3).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(opt.step_info.alpha_next, rel=1e-6)  # stored in the tensor's float32
    assert opt.step_info.alpha_next != 0.01


_HOOK_CALLS: list[int] = []


def _count_step(optimizer, args, kwargs) -> None:
    _HOOK_CALLS.append(id(optimizer))


def test_a_pickled_newt_keeps_its_hooks_and_trains_on_like_the_original():
    import pickle

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-2))
    opt.register_step_post_hook(_count_step)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure_of(m, o):
        def closure():
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        return closure

    opt.step(closure_of(model, opt))
    twin_model, twin = pickle.loads(pickle.dumps((model, opt)))
    opt.step(closure_of(model, opt))
    _HOOK_CALLS.clear()
    twin.step(closure_of(twin_model, twin))
    assert _HOOK_CALLS == [id(twin)]  # torch's __setstate__ ran: the hooks and the patched step survive
    assert torch.equal(model.weight, twin_model.weight) and twin.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert twin.step_info == opt.step_info

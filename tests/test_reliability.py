"""Faults during a step: non-finite numbers, loss spikes, exceptions, a zero direction.

Each test builds the fault by hand on a problem small enough that the expected parameters and
rate are computed independently (plain tensor arithmetic), then checks what ``Newt`` left
behind: the parameters (bit for bit where the policy promises ``theta_t``), the rate, the
decision, and the inner optimizer's state.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from newt import Decision, Newt
from newt.rules import taylor


class InjectedFault(Exception):
    """Raised by the closures below; nothing else raises it."""


def _closure(opt: Newt, p: torch.Tensor, *, loss_fn, faults: dict[int, str] | None = None):
    """A closure over ``loss_fn(p)`` that misbehaves on the call numbers listed in ``faults``.

    Fault kinds: ``"nan_loss"`` (loss and gradient NaN), ``"inf_loss"`` (the returned loss is
    inf, the gradient stays finite), ``"nan_grad"`` (finite loss, one NaN gradient entry),
    ``"raise"`` (raises :class:`InjectedFault` after backward).
    """
    faults = faults or {}
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        kind = faults.get(calls["n"])
        opt.zero_grad()
        loss = loss_fn(p)
        if kind == "nan_loss":
            loss = loss * math.nan
        loss.backward()
        if kind == "nan_grad":
            p.grad[0] = math.nan
        if kind == "raise":
            raise InjectedFault(f"call {calls['n']}")
        if kind == "inf_loss":
            return loss.detach() + math.inf
        return loss

    closure.calls = calls
    return closure


def _half_square(p: torch.Tensor) -> torch.Tensor:
    return 0.5 * p.pow(2).sum()


def _start() -> nn.Parameter:
    return nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))


# ---------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize(
    ("kind", "forward_only"), [("nan_loss", None), ("nan_loss", False), ("nan_grad", False)]
)  # a forward-only lookahead (the default) computes no gradient to be NaN
def test_nonfinite_lookahead_with_rejection_restores_theta_and_shrinks_the_rate(kind, forward_only):
    p = _start()
    before = p.detach().clone()
    opt = Newt(
        torch.optim.SGD([p], lr=0.1, momentum=0.9), reject_nonfinite=True, shrink=0.25, forward_only=forward_only
    )
    closure = _closure(opt, p, loss_fn=_half_square, faults={2: kind})

    loss = opt.step(closure)

    assert float(loss.detach()) == 0.5 * float(before.pow(2).sum())
    assert torch.equal(p.detach(), before)  # bit for bit: back at theta_t
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    info = opt.step_info
    assert info.rejected and info.decision == Decision.NONFINITE
    assert not all(math.isfinite(v) for v in (info.f1, info.d1))
    # The inner step ran with the finite gradient of theta_t: its momentum holds that gradient.
    assert torch.equal(opt.state[p]["momentum_buffer"], before)
    assert (opt.state_dict()["newt"]["steps"], opt.state_dict()["newt"]["rejected"]) == (1, 1)


def test_nonfinite_lookahead_without_rejection_keeps_the_step_and_shrinks_the_rate():
    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.SGD([p], lr=0.1), shrink=0.25, reject_nonfinite=False)

    opt.step(_closure(opt, p, loss_fn=_half_square, faults={2: "nan_loss"}))

    assert torch.equal(p.detach(), before - 0.1 * before)  # plain SGD step: grad of 0.5|p|^2 is p
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.step_info.decision == Decision.NONFINITE and not opt.step_info.rejected


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad", "inf_loss"])
def test_nonfinite_first_call_with_rejection_skips_the_inner_step_entirely(kind):
    p = _start()
    opt = Newt(torch.optim.Adam([p], lr=0.1), reject_nonfinite=True, shrink=0.5)
    opt.step(_closure(opt, p, loss_fn=_half_square))  # one good step, so Adam has state
    lr = opt.param_groups[0]["lr"]
    before = p.detach().clone()
    inner_state = copy.deepcopy(opt.inner.state_dict()["state"])

    closure = _closure(opt, p, loss_fn=_half_square, faults={1: kind})
    opt.step(closure)

    assert closure.calls["n"] == 1  # no lookahead: nothing was stepped
    assert torch.equal(p.detach(), before)
    after = opt.inner.state_dict()["state"]
    assert after.keys() == inner_state.keys()
    for index, state in inner_state.items():
        for key, value in state.items():
            assert torch.equal(after[index][key], value), key  # moments and step count untouched
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.5)
    info = opt.step_info
    assert info.rejected and info.decision == Decision.NONFINITE
    assert math.isnan(info.f1) and math.isnan(info.d0) and math.isnan(info.d1)
    # and the next, healthy step is an ordinary one
    opt.step(_closure(opt, p, loss_fn=_half_square))
    assert not opt.step_info.rejected and not torch.equal(p.detach(), before)


def test_training_recovers_after_rejected_nonfinite_steps():
    p = _start()
    opt = Newt(torch.optim.SGD([p], lr=0.1), "taylor", reject_nonfinite=True)
    start = float(_half_square(p.detach()))
    for step in range(60):
        faults = {1: "nan_grad"} if step % 10 == 3 else {2: "nan_loss"} if step % 10 == 7 else {}
        opt.step(_closure(opt, p, loss_fn=_half_square, faults=faults))
        assert opt.step_info.rejected == bool(faults)
        assert torch.isfinite(p).all()
        assert math.isfinite(opt.param_groups[0]["lr"])
    # Each fault costs a tenfold rate cut that max_factor=2 wins back in four steps.
    assert float(_half_square(p.detach())) < 1e-6 * start
    assert opt.state_dict()["newt"]["rejected"] == 12


# ---------------------------------------------------------------- loss spikes


def test_a_loss_spike_is_rejected_and_the_rate_shrinks_by_shrink():
    # SGD at lr 5 on 0.5 |p|^2 lands on -4 p: the loss grows 16-fold.
    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.SGD([p], lr=5.0), shrink=0.1)

    opt.step(_closure(opt, p, loss_fn=_half_square))

    info = opt.step_info
    assert info.f1 == pytest.approx(16 * info.f0)
    assert info.decision == Decision.SPIKE and info.rejected
    assert torch.equal(p.detach(), before)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    # the retry from theta_t at the smaller rate is a good step: 0.5 p, a quarter of the loss
    opt.step(_closure(opt, p, loss_fn=_half_square))
    assert not opt.step_info.rejected
    assert torch.allclose(p.detach(), 0.5 * before)


def test_a_loss_spike_without_rejection_keeps_the_step_and_still_shrinks():
    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.SGD([p], lr=5.0), shrink=0.1, reject_spikes=False)
    opt.step(_closure(opt, p, loss_fn=_half_square))
    assert torch.equal(p.detach(), before - 5.0 * before)
    assert opt.step_info.decision == Decision.SPIKE and not opt.step_info.rejected
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_an_infinite_spike_threshold_leaves_the_overshoot_to_the_rule():
    # taylor on this line: d1 = -20 s, curvature 2 (f0 - f1 - d1) = 25 s (s = |p|^2), so the
    # damped Newton step gives 5 * (1 + 0.5 * (-20 / 25)) = 3.
    p = _start()
    opt = Newt(torch.optim.SGD([p], lr=5.0), strategy="taylor", gamma=0.5, spike_threshold=math.inf, start_armijo=0)
    opt.step(_closure(opt, p, loss_fn=_half_square))
    assert opt.step_info.decision == Decision.NEWTON and not opt.step_info.rejected
    assert opt.param_groups[0]["lr"] == pytest.approx(3.0)


def test_spike_rejection_backtracks_a_far_too_large_rate_without_touching_the_model():
    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.SGD([p], lr=1e4), shrink=0.1)
    decisions = []
    for _ in range(5):
        opt.step(_closure(opt, p, loss_fn=_half_square))
        decisions.append(opt.step_info.decision)
        if not opt.step_info.rejected:
            break
        assert torch.equal(p.detach(), before)
    # 1e4, 1e3, 1e2, 1e1 all overshoot past twice the minimiser (lr 2); 1 lands on it exactly
    assert decisions == [Decision.SPIKE] * 4 + [Decision.NEWTON]
    assert torch.equal(p.detach(), torch.zeros_like(before))


# ---------------------------------------------------------------- the start-up Armijo test


def _quadratic(h: float):
    """``h/2 |p|^2``: an SGD step at rate ``a`` achieves a share ``1 - a h / 2`` of the decrease
    its slope predicts (``d0 = a h^2 |p|^2``); its loss rises only beyond ``a = 2 / h``."""
    return lambda p: 0.5 * h * p.pow(2).sum()


def _offset_square(p: torch.Tensor) -> torch.Tensor:
    """``1000 + |p|^2 / 2``: in float32 a tiny step moves it by less than its rounding unit (6e-5)."""
    return 1000.0 + 0.5 * p.pow(2).sum()


def _float32_start() -> nn.Parameter:
    return nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32))


def test_an_unproven_start_that_falls_short_of_armijo_is_undone_then_only_spikes_undo_steps():
    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.SGD([p], lr=1.9), "taylor", shrink=0.1)  # h = 1: a share of 1 - 0.95 = 0.05
    opt.step(_closure(opt, p, loss_fn=_quadratic(1.0)))
    info = opt.step_info
    assert info.f1 < info.f0  # the loss went down, far below the spike threshold
    assert (info.f0 - info.f1) / info.d0 == pytest.approx(0.05)
    assert info.decision == Decision.INSUFFICIENT and info.rejected
    assert torch.equal(p.detach(), before)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.19)
    opt.step(_closure(opt, p, loss_fn=_quadratic(1.0)))  # share 1 - 0.095: the start is proven
    assert not opt.step_info.rejected and opt.step_info.decision == Decision.CLAMPED  # minimiser 1
    assert torch.equal(p.detach(), before - 0.19 * before)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.38)
    checkpoint = copy.deepcopy(opt.state_dict())
    theta = p.detach().clone()

    # The same overshoot (a share of 0.05) after the start is kept; a fresh Newt at the same
    # point and rate undoes it, and one resumed from the checkpoint keeps it.
    rate = opt.param_groups[0]["lr"]
    overshoot = _quadratic(1.9 / rate)
    resumed_p, fresh_p = nn.Parameter(theta.clone()), nn.Parameter(theta.clone())
    resumed = Newt(torch.optim.SGD([resumed_p], lr=1.0), shrink=0.1)
    resumed.load_state_dict(checkpoint)
    fresh = Newt(torch.optim.SGD([fresh_p], lr=rate), shrink=0.1)
    for optimizer, param, kept in ((opt, p, True), (resumed, resumed_p, True), (fresh, fresh_p, False)):
        optimizer.step(_closure(optimizer, param, loss_fn=overshoot))
        info = optimizer.step_info
        assert (info.f0 - info.f1) / info.d0 == pytest.approx(0.05)
        assert info.rejected is not kept
        assert torch.equal(param.detach(), theta) is not kept
    assert fresh.step_info.decision == Decision.INSUFFICIENT


def test_start_armijo_zero_keeps_a_first_step_that_falls_short():
    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.SGD([p], lr=1.9), start_armijo=0.0)
    opt.step(_closure(opt, p, loss_fn=_quadratic(1.0)))
    assert not opt.step_info.rejected and opt.step_info.decision != Decision.INSUFFICIENT
    assert torch.equal(p.detach(), before - 1.9 * before)


def test_a_start_too_small_to_change_the_loss_is_neither_judged_nor_proven():
    # The float32 loss of ~1000 moves by ~5e-6 at a rate of 1e-6, below its rounding unit (6e-5):
    # f0 - f1 is 0 or an ulp either way while d0 ~ 5e-6. Such a step would fail the Armijo test
    # on rounding alone, so it is not judged: it is kept, and the start stays on probation
    # until a step moves the loss measurably.
    p = _float32_start()
    opt = Newt(torch.optim.SGD([p], lr=1e-6))
    opt.step(_closure(opt, p, loss_fn=_offset_square))
    info = opt.step_info
    assert info.d0 > 0.0 and info.f0 - info.f1 < 0.1 * info.d0  # short of Armijo by rounding
    assert not info.rejected and opt.state_dict()["newt"]["start_proven"] is False
    for _ in range(40):  # the rate grows (linear steps) until the Armijo test can judge a step
        opt.step(_closure(opt, p, loss_fn=_offset_square))
        assert not opt.step_info.rejected
        if opt.state_dict()["newt"]["start_proven"]:
            break
    assert opt.state_dict()["newt"]["start_proven"] is True


def test_lazy_updates_take_only_lookahead_steps_until_the_start_is_proven():
    # update_every=3 from a start that fails the test: the step after the undone one would be a
    # plain step at an untested rate; it is a lookahead step instead, and the blocks resume after.
    p = _start()
    opt = Newt(torch.optim.SGD([p], lr=1.9), shrink=0.1, update_every=3)
    decisions = []
    for _ in range(7):
        opt.step(_closure(opt, p, loss_fn=_quadratic(1.0)))
        decisions.append(opt.step_info.decision)
    assert decisions[0] == Decision.INSUFFICIENT and opt.state_dict()["newt"]["rejected"] == 1
    assert decisions[1] != Decision.PLAIN  # tested at 0.19: passes
    assert decisions[2:] == [Decision.PLAIN, decisions[3], Decision.PLAIN, Decision.PLAIN, decisions[6]]
    assert Decision.PLAIN not in (decisions[3], decisions[6])


@pytest.mark.parametrize("strategy", ["taylor", "gen", "retsinas"])
def test_lazy_updates_grow_a_tiny_unproven_start_at_every_step(strategy):
    # The float32 offset square: until a step moves the loss by more than its rounding
    # (a required decrease of 64 float32 units of 1000, 7.6e-3), every step is a lookahead step
    # that grows the rate; no growth is held back for plain steps that do not come. Meanwhile
    # f1 - f0 is rounding alone, and the rules read the slopes (gen read f1 == f0 as a parabola
    # with its minimum at alpha / 2, and shrank the start).
    p = _float32_start()
    opt = Newt(torch.optim.SGD([p], lr=1e-6), strategy, update_every=4)
    rates = []
    while not opt.state_dict()["newt"]["start_proven"]:
        rates.append(opt.param_groups[0]["lr"])
        opt.step(_closure(opt, p, loss_fn=_offset_square))
        assert opt.step_info.decision != Decision.PLAIN and not opt.step_info.rejected
        if not opt.state_dict()["newt"]["start_proven"]:  # (the proving step may hold growth back)
            assert opt.step_info.alpha_next > opt.step_info.alpha  # grows at every step
        assert len(rates) < 40
    assert len(rates) > 4  # long enough that a lazy block would have come
    assert rates[-1] > 1e-6 * 2.0**10


# ---------------------------------------------------------------- exceptions


@pytest.mark.parametrize("call", [1, 2])
def test_an_exception_in_either_closure_call_propagates_unchanged_and_restores_theta(call):
    torch.manual_seed(0)
    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.Adam([p], lr=0.1))
    closure = _closure(opt, p, loss_fn=_half_square, faults={call: "raise"})

    with pytest.raises(InjectedFault) as raised:
        opt.step(closure)

    assert str(raised.value) == f"call {call}" and type(raised.value) is InjectedFault
    assert torch.equal(p.detach(), before)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.step_info is None
    assert opt.state_dict()["newt"]["steps"] == 0

    # The next step works. After a failure in the first call nothing had moved, so it is
    # bit-identical to the first step of an optimizer that never saw the failure.
    opt.step(_closure(opt, p, loss_fn=_half_square))
    clean_p = _start()
    clean = Newt(torch.optim.Adam([clean_p], lr=0.1))
    clean.step(_closure(clean, clean_p, loss_fn=_half_square))
    if call == 1:
        assert torch.equal(p.detach(), clean_p.detach())
        assert opt.param_groups[0]["lr"] == clean.param_groups[0]["lr"]
    else:  # the inner step had run once: Adam's step count shows it, the parameters are sane
        assert opt.state[p]["step"] == 2
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)


def test_an_exception_in_the_inner_step_restores_a_half_updated_model():
    class BreaksHalfway(torch.optim.SGD):
        """Updates the first parameter, then fails: a crash in the middle of an inner step."""

        def step(self, closure=None):
            with torch.no_grad():
                self.param_groups[0]["params"][0].add_(1.0)
            raise InjectedFault("inner optimizer crashed")

    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = Newt(BreaksHalfway([a, b], lr=0.1))

    def closure():
        opt.zero_grad()
        loss = a.sum() ** 2 + b.sum() ** 2
        loss.backward()
        return loss

    with pytest.raises(InjectedFault, match="crashed"):
        opt.step(closure)
    assert torch.equal(a.detach(), torch.ones(2)) and torch.equal(b.detach(), torch.ones(3))


def test_an_exception_in_a_custom_rule_restores_theta():
    def broken_rule(alpha, f0, f1, d0, d1, options):
        raise InjectedFault("rule bug")

    p = _start()
    before = p.detach().clone()
    opt = Newt(torch.optim.SGD([p], lr=0.1), strategy=broken_rule)
    with pytest.raises(InjectedFault, match="rule bug"):
        opt.step(_closure(opt, p, loss_fn=_half_square))
    assert torch.equal(p.detach(), before)
    assert opt.param_groups[0]["lr"] == 0.1


# ---------------------------------------------------------------- a zero direction


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("strategy", ["retsinas", "taylor", "gen"])
def test_a_zero_direction_keeps_the_rate_and_divides_by_nothing(inner, strategy):
    # A flat loss: every gradient is exactly zero, so the inner step moves nothing.
    p = _start()
    before = p.detach().clone()
    opt = Newt(inner([p], lr=0.1), strategy=strategy, eps=0.0)
    for _ in range(3):
        opt.step(_closure(opt, p, loss_fn=lambda q: (q * 0.0).sum() + 1.0))
        info = opt.step_info
        assert (info.f0, info.f1, info.d0, info.d1) == (1.0, 1.0, 0.0, 0.0)
        assert info.decision == Decision.NONCONVEX and not info.rejected
        assert opt.param_groups[0]["lr"] == 0.1
    assert torch.equal(p.detach(), before)


# ---------------------------------------------------------------- a step too small to register


def test_a_step_that_vanishes_in_float32_grows_the_rate_until_it_registers():
    # |d| = 1e-10 * |grad| is far below float32's resolution around 1 (6e-8): theta - d == theta
    # exactly, so D0 = D1 = 0 although the gradient is not zero. Keeping the rate (the zero-
    # direction answer) would freeze training forever.
    p = nn.Parameter(torch.ones(4))
    opt = Newt(torch.optim.SGD([p], lr=1e-10), max_factor=2.0)
    decisions = []
    for _ in range(40):
        opt.step(_closure(opt, p, loss_fn=lambda q: (q - 3.0).pow(2).sum()))
        decisions.append(opt.step_info.decision)
    first_move = decisions.index(next(d for d in decisions if d != Decision.VANISHED))
    # grad = 2 (p - 3) = -4: the step registers once 4 * lr reaches half an ulp of 1 (6e-8)
    assert decisions[:first_move] == [Decision.VANISHED] * first_move
    assert 2.0**first_move * 1e-10 * 4 >= 2.0**-24 > 2.0 ** (first_move - 1) * 1e-10 * 4
    assert float(_half_square(p.detach() - 3.0)) < 1e-3  # and then it trains


def _uphill_momentum_step(**options) -> tuple[Newt, nn.Parameter]:
    """One step of ``Newt(SGD(momentum=0.9, lr=0.01))`` on ``|p|^2 / 2`` whose momentum points uphill.

    A momentum buffer of ``-10 p`` (left by earlier batches) plus the gradient ``p`` makes the
    buffer ``-8 p``: the step goes to ``1.08 p``, away from the minimum. Measured: ``D0 = -0.08
    |p|^2``, ``f1 / f0 = 1.1664`` (below the spike threshold 0.2), ``D1 = -0.0864 |p|^2``; taylor's
    curvature ``2 (f0 - f1 - D1) = 0.0064 |p|^2`` is positive and its target ``1 + 0.5 (-0.0864 /
    0.0064) = -5.75`` times the rate is negative, so the factor clamp halves the rate.
    """
    p = _start()
    inner = torch.optim.SGD([p], lr=0.01, momentum=0.9)
    inner.state[p]["momentum_buffer"] = -10.0 * p.detach().clone()
    opt = Newt(inner, **{"strategy": "taylor", "max_factor": 2.0, **options})
    opt.step(_closure(opt, p, loss_fn=_half_square))
    return opt, p


def test_an_uphill_step_keeps_the_rate_in_lookahead_mode():
    opt, p = _uphill_momentum_step()
    info = opt.step_info
    norm2 = float(_start().detach().pow(2).sum())
    assert info.d0 == pytest.approx(-0.08 * norm2) and info.f1 / info.f0 == pytest.approx(1.1664)
    assert info.decision == Decision.ASCENT and not info.rejected
    assert info.alpha_next == opt.param_groups[0]["lr"] == 0.01
    assert torch.allclose(p.detach(), 1.08 * _start().detach(), rtol=1e-15, atol=0.0)  # the step stands


def test_without_the_hold_in_lazy_mode_or_with_a_custom_rule_an_uphill_step_halves_the_rate():
    def custom_taylor(*args):  # a custom rule's answer to an uphill step is its own choice
        return taylor(*args)

    for options in ({"hold_on_ascent": False}, {"update_every": 2}, {"strategy": custom_taylor}):
        opt, _ = _uphill_momentum_step(**options)
        # update_every=2: the start is unproven (an uphill step is not judged), so this is a
        # lookahead step too; lazy mode follows the rule
        assert opt.step_info.decision == Decision.CLAMPED, options
        assert opt.param_groups[0]["lr"] == pytest.approx(0.005), options


def test_a_step_too_short_to_measure_curvature_grows_the_rate_instead_of_keeping_it():
    # A float32 loss offset by 1000 resolves differences of 6e-5 only: from alpha = 1e-6 the
    # loss drop along the step (about 2e-5) is below that, so taylor's loss-based curvature is
    # noise and reads "not convex" most of the time. The slope, though, is nearly unchanged
    # along the step (h alpha ~ 1e-6 of it): the line minimum at alpha = 1 / h = 1 lies far
    # beyond, and the rate doubles (max_factor) instead of being kept.
    p = nn.Parameter(torch.zeros(64))
    target = torch.linspace(-1.0, 1.0, 64)
    opt = Newt(torch.optim.SGD([p], lr=1e-6), strategy="taylor", max_factor=2.0, noise_correction=0.0)
    rates, decisions = [], []
    for _ in range(30):
        opt.step(_closure(opt, p, loss_fn=lambda q: 1000.0 + _half_square(q - target)))
        rates.append(opt.step_info.alpha_next)
        decisions.append(opt.step_info.decision)
    assert Decision.LINEAR in decisions
    assert Decision.NONCONVEX not in decisions[: decisions.index(Decision.NEWTON, 5)]  # never stuck
    # Doubling from 1e-6 reaches 1/2 after log2(5e5) ~ 19 updates, and no rule can be faster.
    reached = next(t for t, rate in enumerate(rates) if rate >= 0.5)
    assert 18 <= reached <= 21
    assert 0.5 <= rates[-1] <= 1.0 + 1e-6  # the Newton steps then close in on 1 / h from below


def test_a_rejected_nonfinite_step_puts_back_the_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-2), reject_nonfinite=True)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure(inputs):
        def run():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(inputs), y)
            loss.backward()
            return loss

        return run

    opt.step(closure(x))
    statistics = {k: v.clone() for k, v in model[1].state_dict().items()}
    broken = x.clone()
    broken[3, 1] = float("nan")  # one broken sample: NaN loss, NaN gradients, NaN running statistics
    opt.step(closure(broken))
    assert opt.step_info.rejected and opt.step_info.decision == "nonfinite"
    for name, value in model[1].state_dict().items():
        assert torch.equal(value, statistics[name]), name
    model.eval()
    assert torch.isfinite(model(x)).all()  # eval mode reads the running statistics


@pytest.mark.slow
def test_with_the_defaults_a_long_run_with_broken_batches_keeps_finite_parameters_and_trains():
    """One batch in 50 is broken (a NaN feature): with the defaults no NaN reaches the model."""
    from tests.models import digits, full_batch_loss, make_mlp, minibatch_indices

    x, y = digits()
    model = make_mlp(0)
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3))
    start = full_batch_loss(model, x, y)
    for step, index in enumerate(minibatch_indices(len(x), 64, 400, seed=3)):
        xb = x[index].clone()
        if step % 50 == 25:
            xb[0, 0] = float("nan")

        def closure(xb=xb, yb=y[index]):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state_dict()["newt"]["rejected"] >= 8  # the eight broken batches, at least
    assert full_batch_loss(model, x, y) < 0.2 * start

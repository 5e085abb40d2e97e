"""The modes and the ownership of the learning rate (docs/math.md), against independent computations.

- lazy updates (``update_every=K`` with a closure): plain steps in between, one closure call each;
- closure-free mode (``step()`` after the user's ``backward()``): the next gradient stands in for
  the lookahead's, optionally summed over blocks of K steps;
- per-group rates;
- learning-rate schedulers, read as a multiplier on the adapted rate;
- checkpoints that resume bit for bit in every mode.

The closed forms use quadratics ``0.5 x^T A x - b^T x`` in float64 with SGD, where the
gradient difference is exact: ``g(x - d) = g(x) - A d``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from newt import Decision, Newt, rules
from newt.schedulers import FactorLR
from tests.models import train_regression
from tests.reference import random_quadratic

WIDE = dict(alpha_min=1e-12, alpha_max=1e12, max_factor=1e9)
UNDAMPED = {"retsinas": dict(gamma=1.0), "gen": dict(smoothing=0.0)}


def _quadratic(seed: int, dim: int = 5):
    return random_quadratic(seed, dim)


def _loss(a, b, x):
    return 0.5 * x @ a @ x - b @ x


def _backward(opt, a, b, x) -> torch.Tensor:
    opt.zero_grad()
    loss = _loss(a, b, x)
    loss.backward()
    return loss


def _grad(a, b, x) -> torch.Tensor:
    return a @ x.detach() - b


# ---------------------------------------------------------------- lazy updates


def test_lazy_updates_adapt_every_k_steps_and_take_plain_inner_steps_in_between():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    reference = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    reference.load_state_dict(model.state_dict())
    batches = [(torch.randn(16, 6), torch.randn(16, 1)) for _ in range(9)]
    opt = Newt(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), update_every=3)
    plain = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    calls, rates_used, decisions = 0, [], []
    for x, y in batches:

        def closure():
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        rates_used.append(opt.param_groups[0]["lr"])
        opt.step(closure)
        decisions.append(opt.step_info.decision)
        assert not opt.step_info.rejected
        # The reference: the same inner optimizer alone, at the rate Newt used for this step.
        plain.param_groups[0]["lr"] = rates_used[-1]
        plain.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        plain.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q)

    assert calls == 3 * 2 + 6 * 1  # lookahead steps call the closure twice, plain steps once
    adapting = [i for i, d in enumerate(decisions) if d != Decision.PLAIN]
    assert adapting == [0, 3, 6]
    assert rates_used[1] == rates_used[2] and rates_used[4] == rates_used[5]  # constant inside a block
    assert rates_used[3] != rates_used[0] and rates_used[6] != rates_used[3]  # adapted at each lookahead
    # The plain steps use the rate the lookahead step just tested, or the new one if smaller
    # (a larger one is first tested by the next lookahead step).
    assert rates_used[1] == min(rates_used[0], rates_used[3])
    assert rates_used[4] == min(rates_used[3], rates_used[6])


@pytest.mark.parametrize("start", ["too small", "too large"])
def test_lazy_updates_hold_an_increase_back_until_the_next_lookahead_step(start):
    # SGD on a quadratic: the step's line minimiser is g.g / g.A.g in closed form.
    a, b, x = _quadratic(seed=2)
    g = _grad(a, b, x)
    minimiser = float(g @ g / (g @ a @ g))
    alpha0 = minimiser / 8 if start == "too small" else minimiser * 1.5  # 1.5x: no loss spike
    opt = Newt(torch.optim.SGD([x], lr=alpha0), strategy="retsinas", update_every=3, gamma=1.0, **WIDE)
    used = []
    for _ in range(4):
        used.append(opt.param_groups[0]["lr"])
        opt.step(lambda: _backward(opt, a, b, x))
    assert used[0] == alpha0
    assert used[3] == pytest.approx(minimiser, rel=1e-9)  # the next lookahead step uses the new rate
    if start == "too small":
        assert used[1] == used[2] == alpha0  # the plain steps keep the tested rate
    else:
        assert used[1] == used[2] == pytest.approx(minimiser, rel=1e-9)  # a decrease applies at once


BASE = 10.0
"""A constant added to the quadratic's loss, which keeps every loss of these runs positive."""


def _first_loss(seed: int = 2) -> float:
    a, b, x = _quadratic(seed)
    return float(_loss(a, b, x.detach())) + BASE


JUMP = 5.0
"""An offset of ``JUMP * _first_loss()`` lifts a step's loss above four times every earlier one."""


def _run_with_offsets(
    offsets: list[float], *, rise_threshold: float = 3.0, seed: int = 2, start: float = 1 / 8, opt=None, state=None
):
    """Lazy SGD (K = 4) on a quadratic whose loss at step t is shifted by ``BASE + offsets[t]``.

    A constant shift moves both closure calls' losses alike and no gradient: it plays a batch
    whose loss is higher without changing the step. The initial rate is ``start`` times the
    first step's line minimiser. Returns the optimizer, the closure calls per step, each step's
    decision and rate, the line minimiser of each step's gradient, and the quadratic.
    """
    a, b, x = _quadratic(seed) if state is None else state
    if opt is None:
        opt = Newt(
            torch.optim.SGD([x], lr=start * _line_minimiser(a, _grad(a, b, x))),
            strategy="retsinas",
            update_every=4,
            gamma=1.0,
            start_armijo=0.0,  # no probation: the plain steps are plain from the first block on
            noise_correction=0.0,
            rise_threshold=rise_threshold,
            **WIDE,
        )
    calls, decisions, rates, minimisers = [], [], [], []
    for offset in offsets:
        count = 0

        def closure():
            nonlocal count
            count += 1
            opt.zero_grad()
            loss = _loss(a, b, x) + BASE + offset
            loss.backward()
            return loss

        rates.append(opt.param_groups[0]["lr"])
        minimisers.append(_line_minimiser(a, _grad(a, b, x)))
        opt.step(closure)
        calls.append(count)
        decisions.append(opt.step_info.decision)
    return opt, calls, decisions, rates, minimisers, (a, b, x)


def _line_minimiser(a: torch.Tensor, g: torch.Tensor) -> float:
    """SGD's step along -g on the quadratic: the rate that minimises the loss, g.g / g.A.g."""
    return float(g @ g / (g @ a @ g))


def test_lazy_mode_measures_a_plain_step_whose_loss_rose_sharply():
    # Undamped retsinas on SGD over a quadratic lands on the line minimiser of the step's own
    # gradient. From 1.5 times the first one: step 0 lowers the rate to it at once; step 1, a
    # plain step whose loss rose sharply, is measured and lowers it to its own line's minimiser.
    jump = [0.0, JUMP * _first_loss(seed=1)] + [0.0] * 10
    _, calls, decisions, rates, minimisers, _ = _run_with_offsets(jump, seed=1, start=1.5)
    assert calls == [2, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]  # step 1 measured; the schedule unchanged
    assert [d == Decision.PLAIN for d in decisions] == [c == 1 for c in calls]
    assert rates[1] == pytest.approx(minimisers[0], rel=1e-9)
    assert minimisers[1] < rates[1]
    assert rates[2] == pytest.approx(minimisers[1], rel=1e-9)
    assert rates[2] == rates[3] == rates[4]


def test_a_measured_plain_step_never_raises_the_rate():
    # From an eighth of the first line minimiser, step 0 proposes an increase, held back for the
    # next scheduled lookahead step (4); step 1's loss rose sharply, and its measurement, which
    # proposes an increase too, drops both: a batch picked for its high loss may only lower it.
    jump = [0.0, JUMP * _first_loss()] + [0.0] * 7
    _, calls, _, rates, minimisers, _ = _run_with_offsets(jump)
    assert calls == [2, 2, 1, 1, 2, 1, 1, 1, 2]
    assert minimisers[1] > rates[1]
    assert rates[0] == rates[1] == rates[2] == rates[3] == rates[4]
    assert rates[8] == pytest.approx(minimisers[4], rel=1e-9)  # step 4 still adapts as scheduled
    # Without the rise check step 1 is plain and step 4 uses the increase step 0 proposed.
    _, calls, _, rates, minimisers, _ = _run_with_offsets(jump, rise_threshold=math.inf)
    assert calls == [2, 1, 1, 1, 2, 1, 1, 1, 2]
    assert rates[4] == pytest.approx(minimisers[0], rel=1e-9)


@pytest.mark.parametrize(
    "offsets, rise_threshold",
    [
        ([0.0] * 6 + [2.0 * _first_loss()] + [0.0] * 5, 3.0),  # below four times the first loss
        ([0.0] * 6 + [JUMP * _first_loss()] + [0.0] * 5, math.inf),  # the check turned off
    ],
    ids=["below-the-threshold", "off"],
)
def test_lazy_mode_keeps_a_plain_step_plain_below_the_rise_threshold(offsets, rise_threshold):
    _, calls, decisions, *_ = _run_with_offsets(offsets, rise_threshold=rise_threshold)
    assert calls == [2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    assert decisions[6] == Decision.PLAIN


def test_lazy_mode_compares_with_the_largest_of_the_last_eight_losses():
    # A high loss at step 1 is the largest of the window until it falls out of it, 8 steps on:
    # the same high loss again at step 9 is within the window's largest, at step 10 it is not.
    high = JUMP * _first_loss()
    for repeat_at, measured in ((9, False), (10, True)):
        offsets = [0.0] * 12
        offsets[1] = offsets[repeat_at] = high
        _, calls, _, _, _, _ = _run_with_offsets(offsets)
        assert calls[1] == 2  # the first rise is measured (a plain step)
        assert (calls[repeat_at] == 2) is measured, (repeat_at, calls)


@pytest.mark.parametrize("window", ["saved", "emptied"])
def test_the_recent_losses_survive_a_checkpoint(window):
    opt, _, _, _, _, (a, b, x) = _run_with_offsets([0.0] * 6)
    state = opt.state_dict()
    assert len(state["newt"]["recent_losses"]) == 6
    if window == "emptied":  # the control: what a resumed run without the window would do
        state["newt"]["recent_losses"] = []
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    x_copy = x.detach().clone().requires_grad_(True)
    resumed = Newt(torch.optim.SGD([x_copy], lr=1.0), strategy="retsinas", update_every=4, start_armijo=0.0, **WIDE)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert resumed.state_dict()["newt"]["recent_losses"] == state["newt"]["recent_losses"]
    # step 6 is plain and its loss rose sharply: only a resumed window can tell
    _, calls, _, _, _, _ = _run_with_offsets([JUMP * _first_loss(), 0.0], opt=resumed, state=(a, b, x_copy))
    assert calls == ([2, 1] if window == "saved" else [1, 1])


def test_a_measured_plain_step_replays_the_random_state_of_its_first_call():
    # dropout-like randomness: both closure calls of the measured step must draw the same numbers,
    # and the run's random stream must be as if every step had called the closure once
    torch.manual_seed(3)
    a, b, x = _quadratic(seed=2)
    opt = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas", update_every=4, start_armijo=0.0, **WIDE)
    offsets = [0.0] * 6 + [JUMP * _first_loss()] + [0.0]
    draws = []
    for offset in offsets:

        def closure():
            opt.zero_grad()
            noise = torch.rand(())
            draws.append(float(noise))
            loss = _loss(a, b, x) + BASE + offset + 1e-3 * noise
            loss.backward()
            return loss

        opt.step(closure)
    torch.manual_seed(3)
    once_per_step = [float(torch.rand(())) for _ in offsets]
    calls = [2, 1, 1, 1, 2, 1, 2, 1]  # lookahead steps 0 and 4, the measured plain step 6
    expected = [d for d, n in zip(once_per_step, calls) for _ in range(n)]
    assert draws == expected


# ---------------------------------------------------------------- the default strategy


def _rates_of(
    strategy: str, closure_free: bool, per_group: bool = False, steps: int = 12, given_loss: bool = False, **options
) -> list[float]:
    a, b, x = _quadratic(4)
    inner = torch.optim.SGD([{"params": [x], "lr": 1e-3}])
    opt = Newt(inner, strategy=strategy, per_group=per_group, **options)
    rates = []
    for _ in range(steps):
        if closure_free:
            loss = _backward(opt, a, b, x)
            opt.step(loss=loss) if given_loss else opt.step()
        else:
            opt.step(lambda: _backward(opt, a, b, x))
        rates.append(opt.param_groups[0]["lr"])
    assert all(math.isfinite(r) for r in rates)
    return rates


@pytest.mark.parametrize(
    ("closure_free", "per_group", "given_loss", "options", "same_as"),
    [
        (False, False, False, {}, "gen"),
        (True, False, False, {}, "retsinas"),
        (True, False, True, {}, "gen"),  # the loss given and checked for a blow-up
        (True, True, True, {}, "gen"),
        (True, False, True, {"blow_up_threshold": math.inf}, "retsinas"),  # given, but nothing checks it
        (False, True, False, {}, "retsinas"),
        (True, True, False, {}, "retsinas"),
    ],
)
def test_which_rule_the_default_strategy_takes_in_each_mode(closure_free, per_group, given_loss, options, same_as):
    def rates(strategy: str) -> list[float]:
        return _rates_of(strategy, closure_free, per_group, given_loss=given_loss, **options)

    auto = rates("auto")
    assert auto == rates(same_as)  # the same rates, bit for bit
    other = {"gen": "retsinas", "retsinas": "gen"}[same_as]
    assert auto != rates(other)  # and the two rules differ here
    assert Newt(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)).strategy == "auto"


def test_the_default_strategy_picks_the_closure_free_rule_step_by_step_from_whether_the_loss_is_given():
    # A loop that gives the loss on some steps only (say, a GradScaler skipped a step): each
    # measured step's new rate is the pure rule's answer to that step's own measurements,
    # gen's slope form where the loss came with the step, retsinas where it did not.
    a, b, x = _quadratic(4)
    opt = Newt(torch.optim.SGD([x], lr=1e-3), start_armijo=0.0)  # no start-up test: nothing undone
    given = [True, True, False, True, False, False, True, True, False, True]
    seen = []
    for give in given:
        loss = _backward(opt, a, b, x)
        opt.step(loss=loss) if give else opt.step()
        seen.append((give, opt.step_info))
    told_apart = set()  # the kinds of step on which the other rule would have answered otherwise
    for give, info in seen[1:]:  # the first step only measures
        rule, other = (rules.gen_slopes, rules.retsinas) if give else (rules.retsinas, rules.gen_slopes)
        expected = rule(info.alpha, 0.0, 0.0, info.d0, info.d1, opt.options)
        assert info.alpha_next == expected.alpha and info.decision == expected.decision
        if other(info.alpha, 0.0, 0.0, info.d0, info.d1, opt.options).alpha != info.alpha_next:
            told_apart.add(give)
    assert told_apart == {True, False}


def test_an_unknown_strategy_lists_the_names_auto_included():
    names = "valid names are 'auto', 'retsinas', 'taylor', 'gen'"
    with pytest.raises(ValueError, match=f"unknown strategy 'newton'; {names}"):
        Newt(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), strategy="newton")


# ---------------------------------------------------------------- closure-free mode


@pytest.mark.parametrize("strategy", ["retsinas", "gen"])
@pytest.mark.parametrize("seed", range(3))
def test_closure_free_step_lands_on_the_line_minimiser_of_the_previous_step(strategy, seed):
    # SGD steps along g; on a quadratic the gradient difference is exact, so the undamped
    # rules set the rate to <g, g> / <g, A g> of the previous step's gradient.
    a, b, x = _quadratic(seed)
    opt = Newt(torch.optim.SGD([x], lr=0.01), strategy=strategy, **UNDAMPED[strategy], **WIDE)
    g0 = _grad(a, b, x)
    _backward(opt, a, b, x)
    assert opt.step() is None
    assert opt.step_info.decision == Decision.PLAIN  # nothing to measure yet
    assert opt.param_groups[0]["lr"] == 0.01

    g1 = _grad(a, b, x)
    x1 = x.detach().clone()
    _backward(opt, a, b, x)
    opt.step()
    expected = float(g0 @ g0 / (g0 @ a @ g0))
    assert opt.step_info.alpha_next == pytest.approx(expected, rel=1e-10)
    d = 0.01 * g0  # the previous step
    assert opt.step_info.d0 == pytest.approx(float(g0 @ d), rel=1e-12)
    assert opt.step_info.d1 == pytest.approx(float(g1 @ d), rel=1e-12)
    assert math.isnan(opt.step_info.f0) and math.isnan(opt.step_info.f1)
    # and the step just taken already used the new rate
    assert torch.allclose(x.detach(), x1 - expected * g1, rtol=0, atol=1e-12)


def test_a_nearly_linear_step_grows_the_rate_only_where_the_losses_confirm_descent():
    # At alpha = 1e-13 the slope changes by about 1e-13 of itself along the step, below the
    # rules' eps (1e-8): retsinas (slopes only, so no float64 loss round-off) reads "not
    # convex". With the losses (lookahead) the step is seen to descend and the rate doubles;
    # closure-free mode has no loss to confirm that, so it keeps it.
    a, b, x = _quadratic(4)
    opt = Newt(torch.optim.SGD([x], lr=1e-13), strategy="retsinas", alpha_min=1e-16)
    opt.step(lambda: _backward(opt, a, b, x))
    assert opt.step_info.decision == Decision.LINEAR and opt.step_info.f1 < opt.step_info.f0
    assert opt.param_groups[0]["lr"] == 2e-13

    a, b, x = _quadratic(4)
    opt = Newt(torch.optim.SGD([x], lr=1e-13), strategy="retsinas", alpha_min=1e-16)
    for _ in range(2):  # the first closure-free step only records its direction
        _backward(opt, a, b, x)
        opt.step()
    assert opt.step_info.decision == Decision.NONCONVEX
    assert opt.param_groups[0]["lr"] == 1e-13


def test_a_custom_rule_that_keeps_the_rate_on_a_nearly_linear_step_is_obeyed():
    def keep(alpha, f0, f1, d0, d1, options):
        return alpha, "nonconvex"

    a, b, x = _quadratic(4)
    opt = Newt(torch.optim.SGD([x], lr=1e-13), strategy=keep, alpha_min=1e-16)
    opt.step(lambda: _backward(opt, a, b, x))
    assert opt.step_info.decision == Decision.NONCONVEX and opt.step_info.f1 < opt.step_info.f0
    assert opt.param_groups[0]["lr"] == 1e-13


def test_closure_free_blocks_adapt_from_the_sums_over_each_block():
    a, b, x = _quadratic(7)
    k = 3
    opt = Newt(torch.optim.SGD([x], lr=0.02), strategy="retsinas", gamma=0.5, update_every=k, **WIDE)
    previous_step, block_d0, block_d1, rate = None, 0.0, 0.0, 0.02
    for t in range(10):
        g = _grad(a, b, x)
        _backward(opt, a, b, x)
        if previous_step is not None:  # the reference: sums of <g_{t-1}, d>, <g_t, d> per block
            g_prev, d = previous_step
            block_d0 += float(g_prev @ d)
            block_d1 += float(g @ d)
        adapts = t >= k and t % k == 0
        if adapts:
            rate = rate * (1 + 0.5 * block_d1 / (block_d0 - block_d1))
            block_d0 = block_d1 = 0.0
        before = x.detach().clone()
        opt.step()
        assert (opt.step_info.decision != Decision.PLAIN) == adapts, t
        assert opt.param_groups[0]["lr"] == pytest.approx(rate, rel=1e-10), t
        previous_step = (g, before - x.detach())


@pytest.mark.parametrize("strategy", ["taylor", "custom"])
def test_closure_free_step_with_a_rule_that_needs_losses_raises_a_clear_error(strategy):
    p = nn.Parameter(torch.ones(3))
    rule = strategy if strategy == "taylor" else (lambda alpha, f0, f1, d0, d1, options: alpha)
    opt = Newt(torch.optim.SGD([p], lr=0.1), strategy=rule)
    p.sum().backward()
    with pytest.raises(ValueError, match="without a closure.*pass a closure.*'retsinas' or 'gen'"):
        opt.step()


def test_closure_free_step_without_gradients_says_to_call_backward():
    opt = Newt(torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1), strategy="retsinas")
    with pytest.raises(RuntimeError, match=r"call loss.backward\(\) before opt.step\(\)"):
        opt.step()


# ------------------------------------------ closure-free start-up test, on the losses given


def _step_with_loss(opt, a, b, x, loss=None) -> float:
    """Backward at ``x``, then ``opt.step(loss=...)`` with the true loss, or ``loss`` if given."""
    true_loss = _backward(opt, a, b, x)
    opt.step(loss=true_loss if loss is None else loss)
    return float(true_loss.detach())


def test_closure_free_start_up_test_undoes_a_step_whose_next_loss_rose_and_shrinks_the_rate():
    a, b, x = _quadratic(2)
    minimiser = float(_grad(a, b, x) @ _grad(a, b, x) / (_grad(a, b, x) @ a @ _grad(a, b, x)))
    rate = 20 * minimiser  # far past the line minimum: the loss grows
    opt = Newt(torch.optim.SGD([x], lr=rate), strategy="retsinas", **WIDE)
    x0 = x.detach().clone()
    f0 = _step_with_loss(opt, a, b, x)
    assert opt.step_info.decision == Decision.PLAIN and not torch.equal(x.detach(), x0)

    f1 = _step_with_loss(opt, a, b, x)
    assert f1 > 1.2 * f0
    info = opt.step_info
    assert info.rejected and info.decision == Decision.SPIKE
    assert (info.f0, info.f1) == (f0, f1)
    assert info.alpha == rate and opt.param_groups[0]["lr"] == pytest.approx(0.1 * rate, rel=1e-15)
    assert torch.equal(x.detach(), x0)  # theta_{t-1} back bit for bit, and no step from it
    assert opt.state_dict()["newt"]["rejected"] == 1

    # the next step starts afresh from x0, with the smaller rate and no stale measurement
    g0 = _grad(a, b, x)
    _step_with_loss(opt, a, b, x)
    assert opt.step_info.decision == Decision.PLAIN
    assert torch.allclose(x.detach(), x0 - 0.1 * rate * g0, rtol=0, atol=1e-12)


def test_closure_free_start_up_test_undoes_a_step_that_fell_far_short_of_its_prediction():
    # SGD's step d = lr * g predicts the decrease d0 = lr <g, g>. The given losses fall by half,
    # which the next batch could explain for a small prediction, not for one of 200 times it.
    a, b, x = _quadratic(2)
    g = _grad(a, b, x)
    lr = 100.0 / float(g @ g)  # d0 = 100
    opt = Newt(torch.optim.SGD([x], lr=lr), strategy="retsinas", **WIDE)
    x0 = x.detach().clone()
    _step_with_loss(opt, a, b, x, loss=1.0)
    _step_with_loss(opt, a, b, x, loss=0.5)
    info = opt.step_info
    assert info.rejected and info.decision == Decision.INSUFFICIENT
    assert info.d0 == pytest.approx(100.0, rel=1e-12)
    assert torch.equal(x.detach(), x0) and opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr, rel=1e-15)

    a, b, x = _quadratic(2)  # the same fall after a step that predicted 1: proven, kept
    opt = Newt(torch.optim.SGD([x], lr=1.0 / float(g @ g)), strategy="retsinas", **WIDE)
    _step_with_loss(opt, a, b, x, loss=1.0)
    _step_with_loss(opt, a, b, x, loss=0.5)
    assert not opt.step_info.rejected


def test_closure_free_start_up_test_ends_at_the_first_sufficient_decrease():
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas")
    _step_with_loss(opt, a, b, x, loss=10.0)
    _step_with_loss(opt, a, b, x, loss=1.0)  # a fall far beyond the Armijo share: start proven
    assert not opt.step_info.rejected
    rate = opt.param_groups[0]["lr"]
    # After the start a batch is no longer judged against the last one: 11.9 is 11.9 times the
    # last loss, but below where training started (10) plus the spike threshold's fifth.
    _step_with_loss(opt, a, b, x, loss=11.9)
    assert not opt.step_info.rejected and opt.param_groups[0]["lr"] != pytest.approx(0.1 * rate)


def _proven_start(**options):
    """A quadratic whose closure-free start passed the test, with the losses 10 then 1 given."""
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas", **options)
    _step_with_loss(opt, a, b, x, loss=10.0)
    _step_with_loss(opt, a, b, x, loss=1.0)
    return a, b, x, opt


def test_closure_free_after_the_start_a_loss_above_the_first_one_undoes_the_step():
    a, b, x, opt = _proven_start()
    _step_with_loss(opt, a, b, x, loss=14.9)  # up to 1.5 times the first loss (10): not judged
    assert not opt.step_info.rejected
    before_last = opt.snapshot[0].clone()  # theta_t, where the last step started
    rate = opt.param_groups[0]["lr"]
    _step_with_loss(opt, a, b, x, loss=15.5)  # above 10 + 0.5 * 10: the run blew up
    info = opt.step_info
    assert info.rejected and info.decision == Decision.SPIKE
    assert (info.f0, info.f1) == (10.0, 15.5)  # the first loss read, and this one
    assert torch.equal(x.detach(), before_last)  # bit for bit, and no step from it
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * rate, rel=1e-15)
    _step_with_loss(opt, a, b, x, loss=float("inf"))  # the next call starts a new measurement
    assert opt.step_info.decision == Decision.PLAIN and not opt.step_info.rejected
    _step_with_loss(opt, a, b, x, loss=float("inf"))  # an infinite loss blew up too
    assert opt.step_info.rejected


def test_closure_free_blow_up_without_rejection_only_shrinks_and_is_off_at_an_infinite_threshold():
    a, b, x, opt = _proven_start(reject_spikes=False)
    rate = opt.param_groups[0]["lr"]
    before = x.detach().clone()
    _step_with_loss(opt, a, b, x, loss=15.5)
    assert opt.step_info.decision == Decision.SPIKE and not opt.step_info.rejected
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * rate, rel=1e-15)
    assert not torch.equal(x.detach(), before)  # the inner step ran, at the smaller rate

    a, b, x, opt = _proven_start(blow_up_threshold=math.inf)
    _step_with_loss(opt, a, b, x, loss=1e6)
    assert opt.step_info.decision != Decision.SPIKE and not opt.step_info.rejected


def test_closure_free_blow_up_check_survives_a_checkpoint():
    a, b, x, opt = _proven_start()
    resumed = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas")
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state_dict()["newt"]["loss_reference"] == 10.0
    _step_with_loss(resumed, a, b, x, loss=15.5)
    assert resumed.step_info.rejected and resumed.step_info.f0 == 10.0


def test_closure_free_blow_up_check_without_a_start_test_takes_the_first_loss_it_reads():
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas", start_armijo=0.0)
    _step_with_loss(opt, a, b, x, loss=10.0)  # the first step only measures: nothing is read
    _step_with_loss(opt, a, b, x, loss=5.0)  # read with the measurements: the reference
    _step_with_loss(opt, a, b, x, loss=7.4)
    assert not opt.step_info.rejected
    _step_with_loss(opt, a, b, x, loss=7.6)  # above 5 + 0.5 * 5
    assert opt.step_info.rejected and (opt.step_info.f0, opt.step_info.f1) == (5.0, 7.6)
    assert opt.state_dict()["newt"]["loss_reference"] == 5.0


@pytest.mark.parametrize("start_armijo", [0.1, 0.0])
def test_closure_free_start_up_test_waits_for_a_decrease_and_is_off_at_start_armijo_zero(start_armijo):
    a, b, x = _quadratic(2)
    # reject_spikes=False: the later blow-up check would undo the rise below too; the start-up
    # test undoes whatever reject_spikes says.
    opt = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas", start_armijo=start_armijo, reject_spikes=False)
    f = _step_with_loss(opt, a, b, x)
    before_last = x.detach().clone()
    _step_with_loss(opt, a, b, x, loss=f)  # no decrease (a noisy batch): neither proven nor undone
    assert not opt.step_info.rejected
    _step_with_loss(opt, a, b, x, loss=10 * f)  # still on probation: a rise undoes the last step
    assert opt.step_info.rejected == (start_armijo > 0)
    assert torch.equal(x.detach(), before_last) == (start_armijo > 0)


def test_closure_free_start_up_test_survives_a_checkpoint():
    def run(split: bool):
        a, b, x = _quadratic(2)
        opt = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas")
        f = _step_with_loss(opt, a, b, x)
        if split:  # resume between the step that set the loss and the one that compares with it
            buffer = io.BytesIO()
            torch.save({"x": x.detach().clone(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            a, b, x = _quadratic(2)
            with torch.no_grad():
                x.copy_(saved["x"])
            opt = Newt(torch.optim.SGD([x], lr=1e-3), strategy="retsinas")
            opt.load_state_dict(saved["opt"])
        _step_with_loss(opt, a, b, x, loss=10 * f)
        return opt.step_info.rejected, x.detach().clone(), opt.param_groups[0]["lr"]

    straight, resumed = run(split=False), run(split=True)
    assert straight[0] and resumed[0]
    assert torch.equal(straight[1], resumed[1]) and straight[2] == resumed[2]


def test_step_with_a_closure_and_a_loss_is_rejected_before_anything_moves():
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=0.1))
    before = x.detach().clone()
    with pytest.raises(ValueError, match="both a closure and loss="):
        opt.step(lambda: _backward(opt, a, b, x), loss=1.0)
    assert torch.equal(x.detach(), before) and opt.step_info is None


@pytest.mark.parametrize(
    ("loss", "error"),
    [(torch.ones(3), r"step\(loss=\.\.\.\) got a tensor of shape \(3,\)"), ("1.0", r"got str.*scalar tensor")],
)
@pytest.mark.parametrize("start_armijo", [0.1, 0.0])  # 0: the loss is never read, still checked
def test_closure_free_step_with_a_loss_that_is_not_a_scalar_says_so(loss, error, start_armijo):
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=0.1), strategy="retsinas", start_armijo=start_armijo)
    _backward(opt, a, b, x)
    with pytest.raises(TypeError, match=error):
        opt.step(loss=loss)


def _given_loss_run(give: str, losses: list[float | None]) -> list[tuple]:
    """Closure-free steps on a quadratic with far too large a start, each with a loss (None: the
    true one) passed as ``step(loss=...)`` or first given with ``give_loss``; one record per step."""
    a, b, x = _quadratic(2)
    g = _grad(a, b, x)
    opt = Newt(torch.optim.SGD([x], lr=20 * float(g @ g / (g @ a @ g))), strategy="retsinas", **WIDE)
    records = []
    for loss in losses:
        true_loss = _backward(opt, a, b, x)
        given = true_loss if loss is None else loss
        if give == "step":
            opt.step(loss=given)
        else:
            opt.give_loss(given)
            opt.step()
        info = opt.step_info
        records.append((info.decision, info.rejected, info.f0, info.f1, opt.param_groups[0]["lr"], x.detach().clone()))
    return records


def test_give_loss_then_a_bare_step_is_step_with_the_loss():
    losses = [None, None, None, 0.5, None, None]  # an undone spike first; later the loss given is ignored
    by_step, by_give = _given_loss_run("step", losses), _given_loss_run("give_loss", losses)
    assert by_step[1][:2] == (Decision.SPIKE, True)
    for step, give in zip(by_step, by_give, strict=True):
        assert step[:5] == give[:5] and torch.equal(step[5], give[5])


def _far_too_large_start():
    """A quadratic and ``Newt(SGD)`` at 20 times the line minimiser's rate: the loss rises."""
    a, b, x = _quadratic(2)
    g = _grad(a, b, x)
    return a, b, x, Newt(torch.optim.SGD([x], lr=20 * float(g @ g / (g @ a @ g))), strategy="retsinas", **WIDE)


def test_a_later_given_loss_replaces_an_earlier_one():
    a, b, x, opt = _far_too_large_start()
    f0 = _backward(opt, a, b, x)
    opt.give_loss(1e6)  # stale (a window whose step a GradScaler skipped): replaced before the step
    opt.give_loss(f0)
    opt.step()
    opt.give_loss(_backward(opt, a, b, x))
    opt.step()
    assert opt.step_info.rejected and opt.step_info.decision == Decision.SPIKE
    assert opt.step_info.f0 == float(f0.detach())  # compared with the second loss given, not 1e6


def test_a_given_loss_serves_one_step_only():
    a, b, x, opt = _far_too_large_start()
    f0 = _backward(opt, a, b, x)
    opt.give_loss(f0)
    opt.step()
    start = x.detach().clone()
    assert _backward(opt, a, b, x) > 1.2 * f0
    opt.step()  # nothing given this time: no test, although the loss rose by more than a fifth
    assert not opt.step_info.rejected and opt.step_info.decision != Decision.SPIKE
    assert not torch.equal(x.detach(), start)


def test_a_given_loss_with_loss_or_a_closure_is_rejected_before_anything_moves():
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=0.1), strategy="retsinas")
    loss = _backward(opt, a, b, x)
    before = x.detach().clone()
    opt.give_loss(loss)
    with pytest.raises(ValueError, match="give the loss one way only"):
        opt.step(loss=loss)
    opt.give_loss(loss)
    with pytest.raises(ValueError, match="both a closure and a loss from give_loss"):
        opt.step(lambda: _backward(opt, a, b, x))
    assert torch.equal(x.detach(), before) and opt.step_info is None
    assert opt.state_dict()["newt"]["given_loss"] == loss.item()  # a refused call leaves it waiting
    opt.step()  # takes the loss given
    assert opt.state_dict()["newt"]["given_loss"] is None and opt.step_info.decision == Decision.PLAIN
    assert not torch.equal(x.detach(), before)


@pytest.mark.parametrize(
    ("loss", "error"),
    [(torch.ones(3), r"give_loss\(\) got a tensor of shape \(3,\)"), (None, r"give_loss\(\) got NoneType")],
)
def test_give_loss_with_a_loss_that_is_not_a_scalar_says_so_at_once(loss, error):
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=0.1), strategy="retsinas")
    with pytest.raises(TypeError, match=error):
        opt.give_loss(loss)


def test_a_given_loss_goes_into_the_checkpoint():
    a, b, x = _quadratic(2)
    opt = Newt(torch.optim.SGD([x], lr=0.1), strategy="retsinas")
    assert opt.state_dict()["newt"]["given_loss"] is None
    opt.give_loss(torch.tensor(2.5, requires_grad=True) * 1.0)  # detached when given
    state = opt.state_dict()
    assert state["newt"]["given_loss"] == 2.5
    resumed = Newt(torch.optim.SGD([x], lr=0.1), strategy="retsinas")
    resumed.load_state_dict(state)
    assert resumed.state_dict()["newt"]["given_loss"] == 2.5
    del state["newt"]["given_loss"]  # a checkpoint from before give_loss existed
    resumed.load_state_dict(state)
    assert resumed.state_dict()["newt"]["given_loss"] is None


def test_a_closure_step_ends_a_closure_free_measurement():
    a, b, x = _quadratic(3)
    opt = Newt(torch.optim.SGD([x], lr=0.01), strategy="retsinas")
    _backward(opt, a, b, x)
    opt.step()
    opt.step(lambda: _backward(opt, a, b, x))  # a lookahead step in between
    _backward(opt, a, b, x)
    opt.step()
    assert opt.step_info.decision == Decision.PLAIN  # starts a new measurement, no stale d0


# ---------------------------------------------------------------- per-group rates


def _two_group_problem():
    # Two decoupled quadratics with very different curvatures: 0.5 * 2 u^2 and 0.5 * 50 v^2.
    u = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    v = nn.Parameter(torch.tensor([0.5, 3.0], dtype=torch.float64))

    def loss_fn():
        return u.pow(2).sum() + 25.0 * v.pow(2).sum()

    return u, v, loss_fn


@pytest.mark.parametrize("strategy", ["retsinas", "gen"])
def test_per_group_rates_find_each_groups_own_line_minimiser(strategy):
    u, v, loss_fn = _two_group_problem()
    inner = torch.optim.SGD([{"params": [u], "lr": 0.01}, {"params": [v], "lr": 0.001}])
    opt = Newt(inner, strategy=strategy, per_group=True, **UNDAMPED[strategy], **WIDE)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    # a separable quadratic: the minimiser along -g of h x^2 / 2 is 1 / h for each group
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 2.0, rel=1e-10)
    assert opt.param_groups[1]["lr"] == pytest.approx(1 / 50.0, rel=1e-10)
    info = opt.step_info
    assert [g.index for g in info.groups] == [0, 1]
    assert info.groups[1].alpha == 0.001 and info.groups[1].alpha_next == pytest.approx(0.02, rel=1e-10)


def test_per_group_rates_in_closure_free_mode():
    u, v, loss_fn = _two_group_problem()
    inner = torch.optim.SGD([{"params": [u], "lr": 0.01}, {"params": [v], "lr": 0.001}])
    opt = Newt(inner, strategy="retsinas", gamma=1.0, per_group=True, **WIDE)
    for _ in range(2):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert [group["lr"] for group in opt.param_groups] == pytest.approx([0.5, 0.02], rel=1e-10)


def test_global_rate_keeps_the_group_ratio_where_per_group_would_not():
    u, v, loss_fn = _two_group_problem()
    opt = Newt(torch.optim.SGD([{"params": [u], "lr": 0.01}, {"params": [v], "lr": 0.001}]), strategy="retsinas")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"] == pytest.approx(10.0, rel=1e-12)
    assert opt.step_info.groups is None


def test_per_group_with_a_rule_that_needs_losses_is_rejected_at_construction():
    with pytest.raises(ValueError, match="per_group=True .* strategy 'taylor' .*'retsinas' or strategy='gen'"):
        Newt(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), strategy="taylor", per_group=True)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_update_every_must_be_a_positive_integer(value, error):
    with pytest.raises(error, match="update_every must be an integer >= 1"):
        Newt(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), update_every=value)


# ---------------------------------------------------------------- schedulers


def test_a_warm_up_multiplies_the_adapted_rate_which_still_lands_on_the_line_minimiser():
    # One step at warm-up factor 0.1: the step used 0.1 * alpha0; the adapted rate (undamped)
    # is still the line minimiser along that step, and the next rate used is the scheduler's
    # next factor times it.
    a, b, x = _quadratic(11)
    opt = Newt(torch.optim.SGD([x], lr=0.05), strategy="retsinas", gamma=1.0, **WIDE)
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=4)
    g0 = _grad(a, b, x)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    opt.step(lambda: _backward(opt, a, b, x))
    minimiser = float(g0 @ g0 / (g0 @ a @ g0))
    assert opt.step_info.alpha == pytest.approx(0.005)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * minimiser, rel=1e-10)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.325 * minimiser, rel=1e-10)  # factor at step 1


def _random_regression_closure(opt: Newt, model: nn.Module):
    """The closure of one fresh random batch of 16 (6 inputs, 1 target) under an MSE loss."""
    x, y = torch.randn(16, 6), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("strategy", ["retsinas", "taylor", "gen"])
def test_with_a_scheduler_the_rate_used_is_always_the_schedule_factor_times_the_adapted_rate(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3), strategy=strategy)
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, end_factor=1.0, total_iters=4),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
        ],
        milestones=[4],
    )
    # LinearLR's factors, then the cosine's from its own step 0 at the milestone
    factors = [0.25 + 0.75 * t / 4 for t in range(4)] + [(1 + math.cos(math.pi * t / 8)) / 2 for t in range(9)]
    for t, factor in enumerate(factors[:12]):
        adapted_before = opt.adapted_rates[0]
        opt.step(_random_regression_closure(opt, model))
        assert opt.schedule_factors[0] == pytest.approx(factor, rel=1e-9), t
        # the step used the factor times the rate adapted so far, and so will the next one
        assert opt.step_info.alpha == pytest.approx(factor * adapted_before, rel=1e-12), t
        assert opt.param_groups[0]["lr"] == pytest.approx(factor * opt.adapted_rates[0], rel=1e-12), t
        scheduler.step()


def _warm_up_decay_restart(step: int) -> float:
    """Warm-up from 0 over 3 steps, linear decay to 0 at step 10, then a restart from 0."""
    step %= 10
    return min(step / 3, 1.0) * (10 - step) / 10


def test_factor_lr_around_a_plain_optimizer_gives_lambda_lrs_rates():
    def rates(scheduler_class) -> list[list[float]]:
        w, v = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([{"params": [w], "lr": 0.3}, {"params": [v], "lr": 0.01}])
        scheduler = scheduler_class(opt, [_warm_up_decay_restart, lambda step: 0.9**step])
        seen = []
        for _ in range(25):
            seen.append([group["lr"] for group in opt.param_groups])
            opt.step()
            scheduler.step()
        return seen

    factor, absolute = rates(FactorLR), rates(torch.optim.lr_scheduler.LambdaLR)
    assert absolute[0] == [0.0, 0.01] and absolute[10] == [0.0, 0.01 * 0.9**10]  # zeros are in the test
    for ours, theirs in zip(factor, absolute, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-12, abs=0.0)


@pytest.mark.filterwarnings("ignore:The epoch parameter")  # scheduler.step(epoch) is deprecated, still used
def test_factor_lr_takes_the_ratio_to_the_factor_it_applied_when_step_jumps():
    def rate_after(scheduler_class, epochs: list[int | None]) -> float:
        w = torch.zeros(2, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.3)
        scheduler = scheduler_class(opt, lambda step: 1.0 / (1 + step))
        for epoch in epochs:
            opt.step()
            scheduler.step(epoch)
        return opt.param_groups[0]["lr"]

    for epochs in ([None, None, 7], [5, 2, None]):
        expected = rate_after(torch.optim.lr_scheduler.LambdaLR, epochs)
        assert rate_after(FactorLR, epochs) == pytest.approx(expected, rel=1e-12), epochs


@pytest.mark.parametrize("scheduler_class", ["FactorLR", "LambdaLR"])
def test_factor_lr_multiplies_newts_adapted_rate_where_lambda_lr_overwrites_it(scheduler_class):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3), strategy="gen")
    scheduler = {"FactorLR": FactorLR, "LambdaLR": torch.optim.lr_scheduler.LambdaLR}[scheduler_class](
        opt, _warm_up_decay_restart
    )
    used, expected = [], []
    for t in range(14):
        adapted_before = opt.adapted_rates[0]
        opt.step(_random_regression_closure(opt, model))
        used.append(opt.step_info.alpha)
        expected.append(_warm_up_decay_restart(t) * adapted_before)
        if scheduler_class == "FactorLR":
            assert opt.schedule_factors[0] == pytest.approx(_warm_up_decay_restart(t), rel=1e-9), t
        scheduler.step()
    if scheduler_class == "FactorLR":
        assert used == pytest.approx(expected, rel=1e-9, abs=0.0)
        assert max(used) > 10 * 1e-3  # the adapted rate grew under the schedule
    else:  # until the first zero, each step runs at the schedule from 1e-3: the adaptation is lost
        assert used[:10] == pytest.approx([1e-3 * _warm_up_decay_restart(t) for t in range(10)], rel=1e-12)
        assert used[:10] != pytest.approx(expected[:10], rel=1e-3)


# ---------------------------------------------------------------- checkpoints in every mode

MODES = {
    "lookahead": (dict(strategy="taylor"), True),
    "lazy-3": (dict(strategy="taylor", update_every=3), True),
    "closure-free": (dict(strategy="retsinas"), False),
    "closure-free-with-loss": (dict(strategy="retsinas"), "loss"),
    "closure-free-blocks-3": (dict(strategy="gen", update_every=3), False),
    "per-group": (dict(strategy="retsinas", per_group=True), True),
    "per-group-closure-free": (dict(strategy="gen", per_group=True, update_every=2), False),
    "scheduled": (dict(strategy="taylor"), True),
}


def _build(options: dict, with_scheduler: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[2].parameters(), "lr": 3e-3}]
    )
    opt = Newt(inner, **options)
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, 0.2, 1.0, total_iters=10) if with_scheduler else None
    return model, opt, scheduler


def _train(model, opt, scheduler, batches, with_closure: bool | str):
    train_regression(
        model,
        opt,
        batches,
        with_closure=with_closure is True,
        give_loss=with_closure == "loss",
        after_step=scheduler.step if scheduler is not None else None,
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_checkpoint_resume_is_bit_identical_in_every_mode(mode):
    options, with_closure = MODES[mode]
    with_scheduler = mode == "scheduled"
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(13)]

    model, opt, scheduler = _build(options, with_scheduler)
    _train(model, opt, scheduler, batches, with_closure)
    straight = ({k: v.clone() for k, v in model.state_dict().items()}, [g["lr"] for g in opt.param_groups])

    model, opt, scheduler = _build(options, with_scheduler)
    _train(model, opt, scheduler, batches[:7], with_closure)  # stops mid-block in the block modes
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model, opt, scheduler = _build(options, with_scheduler)  # fresh objects, then load
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    _train(model, opt, scheduler, batches[7:], with_closure)

    assert [g["lr"] for g in opt.param_groups] == straight[1]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, straight[0][name]), name


def test_a_constant_lambda_schedule_writing_back_the_initial_rate_leaves_the_adaptation_alone():
    # LambdaLR is closed-form: every step it writes initial_lr * lambda(t). With lambda = 1 that
    # is the initial rate, which Newt reads as "factor 1" instead of erasing its adapted rate.
    a, b, x = _quadratic(5)
    opt = Newt(torch.optim.SGD([x], lr=1e-4), strategy="retsinas", gamma=1.0, **WIDE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    for _ in range(3):
        opt.step(lambda: _backward(opt, a, b, x))
        adapted = opt.param_groups[0]["lr"]
        scheduler.step()
        assert opt.param_groups[0]["lr"] == 1e-4  # what LambdaLR wrote...
        opt.step(lambda: _backward(opt, a, b, x))
        assert opt.step_info.alpha == adapted  # ...but the step used Newt's rate
    assert opt.param_groups[0]["lr"] > 1e-2

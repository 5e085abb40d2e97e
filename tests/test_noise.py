"""The mini-batch noise correction (``noise_correction``), against independent computations.

- the pure shift: on a quadratic line whose batch version carries a linear noise term, the
  debiased batch measurements give every rule the expected loss's line minimiser;
- the estimate: moving averages, the cap, faults, checkpoints;
- the optimizer: a reference loop written from the formulas (noisy least squares, float64, SGD)
  reproduces Newt's rates and noise shares step for step, in lookahead and lazy modes; a
  deterministic problem measures no noise at all and trains bit for bit as without the
  correction; rejected steps and other parameters leave no stale measurement behind.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from newt import Newt, RuleOptions, gen, gen_slopes, retsinas, taylor
from newt._noise import AVERAGING, NoiseEstimate, debiased
from tests.test_rules import quadratic_lines, undamped_wide

# ---------------------------------------------------------------- the pure shift


@pytest.mark.parametrize("rule", [retsinas, taylor, gen, gen_slopes], ids=lambda r: r.__name__)
@given(q=quadratic_lines(), noise=st.floats(-0.9, 3.0))
def test_debiased_batch_measurements_give_the_expected_loss_line_minimiser(rule, q, noise):
    # The batch's line is the expected line plus a linear term: g_B(a) = g(a) - n a / alpha,
    # with n = noise * d0 (the noise is a share of the expected slope). The batch's numbers:
    f0, f1, d0, d1 = q.measurements()
    n = noise * d0
    batch = (f0, f1 - n, d0 + n, d1 + n)
    share = n / batch[2]  # the share of the batch's d0 that is noise
    f1_fixed, d0_fixed, d1_fixed = debiased(batch[1], batch[2], batch[3], share)
    out = rule(q.alpha, f0, f1_fixed, d0_fixed, d1_fixed, undamped_wide())
    assert out.alpha == pytest.approx(q.minimiser, rel=1e-7)


@pytest.mark.parametrize("rule", [retsinas, taylor, gen, gen_slopes], ids=lambda r: r.__name__)
@given(q=quadratic_lines(), share=st.floats(0.0, 1.0))
def test_the_shift_leaves_every_curvature_estimate_unchanged(rule, q, share):
    f0, f1, d0, d1 = q.measurements()
    f1s, d0s, d1s = debiased(f1, d0, d1, share)
    scale = abs(d0) + abs(d1) + abs(f0) + abs(f1)
    assert d0s - d1s == pytest.approx(d0 - d1, abs=1e-12 * scale)
    assert f0 - f1s - d1s == pytest.approx(f0 - f1 - d1, abs=1e-12 * scale)
    assert f1s - f0 + d0s == pytest.approx(f1 - f0 + d0, abs=1e-12 * scale)


def test_a_zero_share_changes_nothing():
    assert debiased(1.5, 2.0, -0.25, 0.0) == (1.5, 2.0, -0.25)


# ---------------------------------------------------------------- the estimate


def test_the_estimate_is_the_ratio_of_two_moving_averages():
    estimate = NoiseEstimate(cap=1.0)
    observations = [(2.0, 1.0, 0.4), (1.0, 0.5, 0.3), (4.0, 1.0, -0.2)]  # (d0, d1 same, d1 fresh)
    excess = scale = 0.0
    for d0, same, fresh in observations:
        estimate.observe(7, d0, same, fresh)
        excess = AVERAGING * excess + (1 - AVERAGING) * (same - fresh)
        scale = AVERAGING * scale + (1 - AVERAGING) * d0
        assert estimate.fraction(7) == pytest.approx(excess / scale, rel=1e-12)
    assert estimate.fraction(8) == 0.0  # another unit has its own averages


def test_the_estimate_is_capped_and_never_negative():
    estimate = NoiseEstimate(cap=0.5)
    estimate.observe(0, 1.0, 1.0, 0.0)  # all of the slope was noise
    assert estimate.fraction(0) == 0.5
    estimate = NoiseEstimate(cap=0.5)
    estimate.observe(0, 1.0, 0.0, 1.0)  # the fresh batch's slope was larger: no correction
    assert estimate.fraction(0) == 0.0
    estimate = NoiseEstimate(cap=0.5)
    estimate.observe(0, -1.0, 0.0, -1.0)  # the step went uphill on average: nothing to scale by
    assert estimate.fraction(0) == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_observation_is_ignored(bad):
    estimate = NoiseEstimate(cap=1.0)
    estimate.observe(0, 2.0, 1.0, 0.5)
    before = estimate.fraction(0)
    for values in [(bad, 1.0, 0.5), (2.0, bad, 0.5), (2.0, 1.0, bad)]:
        estimate.observe(0, *values)
        assert estimate.fraction(0) == before


def test_the_estimate_round_trips_through_its_state():
    estimate = NoiseEstimate(cap=0.7)
    estimate.observe(-1, 2.0, 1.0, 0.5)
    estimate.observe(3, 1.0, 0.9, 0.1)
    loaded = NoiseEstimate(cap=0.7)
    loaded.load_state_dict(estimate.state_dict())
    assert [loaded.fraction(k) for k in (-1, 3, 5)] == [estimate.fraction(k) for k in (-1, 3, 5)]


# ---------------------------------------------------------------- the optimizer

DIM, ROWS, BATCH = 6, 64, 8


def _least_squares(seed: int):
    """A float64 least-squares problem, its start and a fixed sequence of mini-batches."""
    gen_ = torch.Generator().manual_seed(seed)
    a = torch.randn(ROWS, DIM, generator=gen_, dtype=torch.float64)
    y = a @ torch.randn(DIM, generator=gen_, dtype=torch.float64) + 0.5 * torch.randn(
        ROWS, generator=gen_, dtype=torch.float64
    )
    batches = [torch.randperm(ROWS, generator=gen_)[:BATCH] for _ in range(40)]
    x0 = torch.randn(DIM, generator=gen_, dtype=torch.float64)
    return a, y, batches, x0


def _batch_loss(a, y, idx, x):
    r = a[idx] @ x - y[idx]
    return 0.5 * (r @ r) / len(idx)


def _closure(opt, a, y, idx, x):
    """The usual closure, on the mini-batch ``idx``."""

    def closure():
        opt.zero_grad()
        loss = _batch_loss(a, y, idx, x)
        loss.backward()
        return loss

    return closure


def _batch_grad(a, y, idx, x):
    return a[idx].T @ (a[idx] @ x - y[idx]) / len(idx)


def _reference_rates(a, y, batches, x0, alpha0, cap, gamma, update_every, options):
    """Newt(SGD, taylor) with the noise correction, written out from the formulas.

    Lazy updates: the plain steps use the smaller of the rate just tested and the new one.
    Returns the rate used by every step and the noise share of every lookahead step.
    """
    x, alpha, plain_alpha = x0.clone(), alpha0, alpha0
    excess = scale = 0.0
    probe = None  # (x before the step, d0, d1) of the last lookahead step
    fresh = None  # (d0, d1, fresh d1) waiting for the next lookahead step
    rates, shares = [], []
    for t, idx in enumerate(batches):
        g0 = _batch_grad(a, y, idx, x)
        if probe is not None:  # the first closure step after a lookahead step measures
            x_prev, p0, p1 = probe
            fresh, probe = (p0, p1, float(g0 @ (x_prev - x))), None
        if t % update_every:  # a plain step
            rates.append(plain_alpha)
            x = x - plain_alpha * g0
            continue
        rates.append(alpha)
        step = alpha * g0
        if fresh is not None:
            p0, p1, f = fresh
            excess = AVERAGING * excess + (1 - AVERAGING) * (p1 - f)
            scale = AVERAGING * scale + (1 - AVERAGING) * p0
            fresh = None
        share = min(max(excess / scale, 0.0), cap) if scale > 0 else 0.0
        shares.append(share)
        f0, d0 = float(_batch_loss(a, y, idx, x)), float(g0 @ step)
        x_next = x - step
        f1, d1 = float(_batch_loss(a, y, idx, x_next)), float(_batch_grad(a, y, idx, x_next) @ step)
        s = share * d0
        curvature = 2.0 * ((f0 - (f1 + s)) - (d1 - s))
        proposed = alpha * (1.0 + gamma * (d1 - s) / curvature)
        next_alpha = min(max(proposed, alpha / options["max_factor"]), alpha * options["max_factor"])
        alpha, plain_alpha = next_alpha, min(alpha, next_alpha)
        probe = (x, d0, d1)
        x = x_next
    return rates, shares


@pytest.mark.parametrize("cap", [0.5, 1.0])
@pytest.mark.parametrize("update_every", [1, 3])
def test_rates_and_noise_shares_match_a_reference_loop_on_noisy_least_squares(cap, update_every):
    a, y, batches, x0 = _least_squares(seed=3)
    options = dict(alpha_min=1e-12, alpha_max=1e12, max_factor=2.0)
    expected_rates, expected_shares = _reference_rates(a, y, batches, x0, 0.01, cap, 0.5, update_every, options)

    x = x0.clone().requires_grad_()
    opt = Newt(
        torch.optim.SGD([x], lr=0.01),
        strategy="taylor",
        noise_correction=cap,
        update_every=update_every,
        spike_threshold=math.inf,
        **options,
    )
    rates, shares = [], []
    for idx in batches:
        opt.step(_closure(opt, a, y, idx, x))
        rates.append(opt.step_info.alpha)
        if opt.step_info.decision != "plain":
            shares.append(opt.step_info.noise)
    assert rates == pytest.approx(expected_rates, rel=1e-9)
    assert shares == pytest.approx(expected_shares, rel=1e-9, abs=1e-15)
    assert max(shares) > 0.1  # the problem is noisy: the correction was exercised
    if cap < 1.0 and update_every == 1:
        assert cap in shares  # and so was the cap (lazy updates see fewer, smoother shares)


def test_a_deterministic_problem_measures_no_noise_and_trains_bit_for_bit_as_without():
    # with the lookahead's slope measured: a forward-only lookahead's D1 is a fitted parabola's,
    # and its misfit shows in the estimate (docs/math.md, "What a step measures")
    a, y, _, x0 = _least_squares(seed=5)
    everything = torch.arange(ROWS)
    results = []
    for cap in (0.0, 0.5):
        x = x0.clone().requires_grad_()
        opt = Newt(torch.optim.Adam([x], lr=1e-3), noise_correction=cap, forward_only=False)
        history = []
        for _ in range(30):
            opt.step(_closure(opt, a, y, everything, x))
            history.append((opt.step_info.alpha, opt.step_info.noise))
        results.append((x.detach().clone(), history))
    (x_off, off), (x_on, on) = results
    assert torch.equal(x_off, x_on)
    assert off == on
    assert all(share == 0.0 for _, share in on)


def _noisy_run(batches, a, y, x, opt, steps):
    for idx in batches[:steps]:
        opt.step(_closure(opt, a, y, idx, x))


@pytest.mark.parametrize("update_every", [1, 2, 3])
@pytest.mark.parametrize("stop", [7, 8])
def test_checkpoint_mid_measurement_resumes_bit_for_bit(update_every, stop):
    # stop=7/8 with K=2,3 stops after a lookahead step (probe waiting for its fresh slope, which
    # needs the snapshot of theta_t) or after a plain step (fresh slope waiting for a reduction).
    a, y, batches, x0 = _least_squares(seed=7)

    def build(x):
        return Newt(torch.optim.SGD([x], lr=0.01, momentum=0.5), update_every=update_every)

    x_straight = x0.clone().requires_grad_()
    straight = build(x_straight)
    _noisy_run(batches, a, y, x_straight, straight, 20)

    x_first = x0.clone().requires_grad_()
    first = build(x_first)
    _noisy_run(batches, a, y, x_first, first, stop)
    buffer = io.BytesIO()
    torch.save({"x": x_first.detach(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    x_resumed = saved["x"].clone().requires_grad_()
    resumed = build(x_resumed)
    resumed.load_state_dict(saved["opt"])
    _noisy_run(batches[stop:], a, y, x_resumed, resumed, 20 - stop)

    assert torch.equal(x_resumed, x_straight)
    assert resumed.param_groups[0]["lr"] == straight.param_groups[0]["lr"]
    averages = resumed.state_dict()["newt"]["noise"]["averages"]
    assert averages == straight.state_dict()["newt"]["noise"]["averages"]
    assert averages[0][1] != 0.0  # the noise estimate was exercised


def test_a_rejected_step_leaves_no_measurement_behind():
    a, y, batches, x0 = _least_squares(seed=9)
    x = x0.clone().requires_grad_()
    opt = Newt(torch.optim.SGD([x], lr=0.01))
    _noisy_run(batches, a, y, x, opt, 5)
    assert opt.state_dict()["newt"]["noise"]["probe"] is not None  # a kept step: theta_{t+1} stays
    for group in opt.param_groups:
        group["lr"] = 1e3  # far too large: the next step is a loss spike, undone
    _noisy_run(batches[5:], a, y, x, opt, 1)
    assert opt.step_info.rejected
    assert opt.state_dict()["newt"]["noise"]["probe"] is None


def test_other_parameters_moving_discard_the_measurement():
    a, y, batches, x0 = _least_squares(seed=11)
    x = x0.clone().requires_grad_()
    extra = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = Newt(torch.optim.SGD([x, extra], lr=0.01))
    _noisy_run(batches, a, y, x, opt, 5)  # extra gets no gradient: only x moves
    averages_before = opt.state_dict()["newt"]["noise"]["averages"]
    assert averages_before  # the estimate has observations to lose

    def with_extra(idx):
        opt.zero_grad()
        loss = _batch_loss(a, y, idx, x) + ((extra - 1.0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(lambda: with_extra(batches[5]))  # two parameters move: the probe of one cannot be measured
    assert opt.state_dict()["newt"]["noise"]["averages"] == averages_before
    opt.step(lambda: with_extra(batches[6]))  # the same two again: the last step's probe is measured
    assert opt.state_dict()["newt"]["noise"]["averages"] != averages_before


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_noise_correction_out_of_range_is_rejected(bad):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"noise_correction must be in \[0, 1\]"):
        Newt(torch.optim.SGD([x], lr=0.1), noise_correction=bad)


def test_rule_options_are_untouched_by_the_noise_option():
    x = torch.zeros(2, requires_grad=True)
    assert Newt(torch.optim.SGD([x], lr=0.1), noise_correction=0.3).options == RuleOptions()

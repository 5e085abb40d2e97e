"""Property tests of the policies' predicates (newt.policies): pure functions of a few floats.

Each is checked against its definition in exact arithmetic or a closed form on quadratic lines,
for invariance to scaling the loss, and on hand-computed examples.
"""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import assume, example, given
from hypothesis import strategies as st

from newt.options import RuleOptions
from newt.policies import (
    blew_up,
    grown_rate,
    held_on_ascent,
    is_spike,
    next_batch_verdict,
    rose_sharply,
    sufficient_decrease,
)
from newt.rules import Decision, Proposal, gen
from tests.test_rules import (
    QuadLine,
    all_rules,
    any_finite,
    any_float,
    clamp,
    exactly_scalable,
    log_uniform,
    quadratic_lines,
    rule_options,
)

# --------------------------------------------------------------------------------------------
# The loss-spike policy (applied by Newt before any rule)
# --------------------------------------------------------------------------------------------

thresholds = st.one_of(st.just(math.inf), log_uniform(1e-3, 1e3))


@given(f0=any_float, f1=any_float, threshold=thresholds)
@example(f0=0.0, f1=5e-324, threshold=1.0)  # any rise above a zero loss
@example(f0=-1e308, f1=1.7976931348623157e308, threshold=1.0)  # the rise overflows
def test_the_spike_test_fires_exactly_on_a_finite_rise_above_threshold(f0, f1, threshold):
    rises = False
    if math.isfinite(f0) and math.isfinite(f1) and math.isfinite(threshold):
        # Exact arithmetic (no rounding, no overflow); a rise within rounding of the threshold
        # may go either way in floating point, so those inputs are skipped.
        rise, bound = Fraction(f1) - Fraction(f0), Fraction(threshold) * abs(Fraction(f0))
        assume(abs(rise - bound) > Fraction(1, 10**9) * (abs(Fraction(f1)) + abs(Fraction(f0))) or rise == bound)
        rises = rise > bound
    assert is_spike(f0, f1, threshold) is rises


@given(q=quadratic_lines(), threshold=log_uniform(1e-3, 1e3))
def test_the_spike_test_never_fires_when_the_step_does_not_overshoot_past_twice_the_line_minimiser(q, threshold):
    # On a convex line, g(alpha) <= g(0) exactly when alpha <= 2 b / h: no rise, no spike.
    assume(q.alpha <= 2.0 * q.minimiser * (1 - 1e-9))
    f0, f1, _, _ = q.measurements()
    assume(f1 <= f0)  # rounding of the measured values
    assert not is_spike(f0, f1, threshold)


@given(
    f0=exactly_scalable,
    f1=exactly_scalable,
    k=st.integers(-60, 60),
    threshold=st.sampled_from([0.5, 1.0, 2.0, math.inf]),
)
def test_the_spike_test_is_invariant_to_scaling_the_loss_by_a_power_of_two(f0, f1, k, threshold):
    c = 2.0**k
    assert is_spike(c * f0, c * f1, threshold) is is_spike(f0, f1, threshold)


@given(q=quadratic_lines(), armijo=st.floats(0.01, 0.9))
def test_sufficient_decrease_passes_exactly_up_to_twice_one_minus_armijo_times_the_line_minimiser(q, armijo):
    # On g(a) = c - b a + h a^2 / 2 the share of the predicted decrease b alpha that a step achieves
    # is 1 - alpha h / (2 b) = 1 - alpha / (2 a*): the test passes iff alpha <= 2 (1 - armijo) a*.
    limit = 2.0 * (1.0 - armijo) * q.minimiser
    assume(abs(q.alpha / limit - 1.0) > 1e-6)  # the boundary itself is a matter of rounding
    f0, f1, d0, _ = q.measurements()
    assert sufficient_decrease(f0, f1, d0, armijo) is (q.alpha <= limit)


@given(f0=exactly_scalable, f1=exactly_scalable, d0=exactly_scalable, k=st.integers(-60, 60))
def test_sufficient_decrease_is_invariant_to_scaling_the_loss_by_a_power_of_two(f0, f1, d0, k):
    c = 2.0**k
    assert sufficient_decrease(c * f0, c * f1, c * d0, 0.1) is sufficient_decrease(f0, f1, d0, 0.1)


@given(f0=any_float, f1=any_float, d0=any_float, armijo=st.floats(0.0, 0.99), resolution=st.floats(0.0, 1e3))
def test_sufficient_decrease_judges_only_measurable_descent_steps(f0, f1, d0, armijo, resolution):
    verdict = sufficient_decrease(f0, f1, d0, armijo, resolution)
    applies = all(map(math.isfinite, (f0, f1, d0))) and d0 > 0.0 and armijo * d0 >= resolution
    assert (verdict is None) is (not applies)
    if applies:
        assert verdict is (f0 - f1 >= armijo * d0)


def test_sufficient_decrease_hand_examples():
    assert sufficient_decrease(2.0, 1.0, 10.0, 0.1) is True  # fell by 1 = 0.1 * 10: just enough
    assert sufficient_decrease(2.0, 1.5, 10.0, 0.1) is False  # fell by 0.5 of the 1 required
    assert sufficient_decrease(2.0, 2.5, 10.0, 0.1) is False  # rose
    assert sufficient_decrease(2.0, 2.5, -10.0, 0.1) is None  # not a descent direction
    assert sufficient_decrease(2.0, math.nan, 10.0, 0.1) is None
    # A step whose predicted decrease is below the loss's rounding cannot be judged: at a rate of
    # 1e-9 a float32 loss of 2.3 does not change at all (f1 == f0) while d0 is 6e-13.
    assert sufficient_decrease(2.3, 2.3, 6e-13, 0.1, resolution=1e-5) is None
    assert sufficient_decrease(2.3, 2.3, 6e-13, 0.1) is False


@given(f0=any_finite, f1=any_finite, d0=st.floats(-1e6, 0.0), threshold=st.floats(0.01, 10.0))
def test_next_batch_verdict_is_the_spike_test_for_a_step_that_predicted_no_decrease(f0, f1, d0, threshold):
    verdict = next_batch_verdict(f0, f1, d0, 0.1, threshold)
    assert (verdict is False) is (f1 > f0 + threshold * abs(f0))
    assert verdict is not True  # sufficient_decrease judges descent steps only


@given(f0=any_finite, f1=any_finite, d0=any_finite, armijo=st.floats(0.0, 0.99), threshold=st.floats(0.0, 10.0))
def test_next_batch_verdict_fails_exactly_beyond_the_tolerant_armijo_bound_and_passes_with_armijo(
    f0, f1, d0, armijo, threshold
):
    verdict = next_batch_verdict(f0, f1, d0, armijo, threshold)
    bound = f0 + threshold * abs(f0) - armijo * max(d0, 0.0)
    assert (verdict is False) is (f1 > bound)
    if verdict is not False:
        assert (verdict is True) is (sufficient_decrease(f0, f1, d0, armijo) is True)


@given(f0=exactly_scalable, f1=exactly_scalable, d0=exactly_scalable, k=st.integers(-60, 60))
def test_next_batch_verdict_is_invariant_to_scaling_the_loss_by_a_power_of_two(f0, f1, d0, k):
    c = 2.0**k
    assert next_batch_verdict(c * f0, c * f1, c * d0, 0.1, 0.25) is next_batch_verdict(f0, f1, d0, 0.1, 0.25)


@given(f0=any_finite, f1=any_finite, rise=st.floats(0.0, 1e6), d0=any_finite)
def test_next_batch_verdict_never_accepts_a_higher_loss_after_failing_a_lower_one(f0, f1, rise, d0):
    if next_batch_verdict(f0, f1, d0, 0.1, 0.2) is False:
        assert next_batch_verdict(f0, f1 + rise, d0, 0.1, 0.2) is False


def test_next_batch_verdict_hand_examples():
    # f0 = 2, threshold 0.2: batches may differ by 0.4; armijo 0.1 of a predicted decrease of 10 is 1
    assert next_batch_verdict(2.0, 2.5, 0.0, 0.1, 0.2) is False  # rose by a quarter: a spike
    assert next_batch_verdict(2.0, 2.3, 0.0, 0.1, 0.2) is None  # rose within the tolerance
    assert next_batch_verdict(2.0, 1.0, 10.0, 0.1, 0.2) is True  # fell by the Armijo share
    assert next_batch_verdict(2.0, 1.3, 10.0, 0.1, 0.2) is None  # 0.3 short of 1: within the 0.4
    assert next_batch_verdict(2.0, 1.5, 10.0, 0.1, 0.2) is False  # 0.5 short: beyond it
    assert next_batch_verdict(2.0, 1.5, 100.0, 0.1, 0.2) is False  # predicted 100, fell by 0.5
    assert next_batch_verdict(2.0, math.inf, 1.0, 0.1, 0.2) is False
    assert next_batch_verdict(2.0, math.nan, 1.0, 0.1, 0.2) is None
    assert next_batch_verdict(math.nan, 5.0, 1.0, 0.1, 0.2) is None
    assert next_batch_verdict(2.0, 1e300, 1.0, 0.1, math.inf) is None  # the policy turned off


@given(first=any_finite, f=any_finite, threshold=st.floats(0.01, 10.0))
def test_blew_up_exactly_above_the_first_loss_plus_the_threshold_share(first, f, threshold):
    assert blew_up(first, f, threshold) is (f > first + threshold * abs(first))


@given(first=exactly_scalable, f=exactly_scalable, k=st.integers(-60, 60))
def test_blew_up_is_invariant_to_scaling_the_loss_by_a_power_of_two(first, f, k):
    c = 2.0**k
    assert blew_up(c * first, c * f, 1.0) is blew_up(first, f, 1.0)


@given(first=any_finite, f=any_finite, rise=st.floats(0.0, 1e6), threshold=st.floats(0.01, 10.0))
def test_blew_up_stays_blown_up_for_a_higher_loss_and_a_lower_threshold(first, f, rise, threshold):
    if blew_up(first, f, threshold):
        assert blew_up(first, f + rise, threshold)
        assert blew_up(first, f, threshold / 2)


def test_blew_up_hand_examples():
    assert blew_up(2.3, 4.7, 1.0) and not blew_up(2.3, 4.5, 1.0)  # twice the first loss: the bound
    assert not blew_up(2.3, 4.5, math.inf)  # off
    assert blew_up(2.3, math.inf, 1.0) and not blew_up(2.3, math.nan, 1.0)
    assert not blew_up(math.nan, 100.0, 1.0) and not blew_up(math.inf, 100.0, 1.0)
    assert blew_up(-1.0, -0.5, 0.2) and not blew_up(-1.0, -0.9, 0.2)  # a negative loss: |first|


@given(recent=st.lists(any_finite, min_size=1, max_size=8), f=any_finite, threshold=st.floats(0.01, 10.0))
def test_rose_sharply_exactly_above_the_largest_recent_loss_plus_the_threshold_share(recent, f, threshold):
    top = max(recent)
    assert rose_sharply(recent, f, threshold) is (f > top + threshold * abs(top))


@given(recent=st.lists(exactly_scalable, min_size=1, max_size=8), f=exactly_scalable, k=st.integers(-60, 60))
def test_rose_sharply_is_invariant_to_scaling_the_losses_by_a_power_of_two(recent, f, k):
    c = 2.0**k
    assert rose_sharply([c * x for x in recent], c * f, 3.0) is rose_sharply(recent, f, 3.0)


@given(
    recent=st.lists(any_finite, min_size=1, max_size=8),
    lower=st.floats(0.0, 1e6),
    f=any_finite,
    threshold=st.floats(0.01, 10.0),
)
def test_rose_sharply_only_counts_the_largest_recent_loss(recent, lower, f, threshold):
    # a lower loss joining the window changes nothing: batch losses below the top are noise
    assert rose_sharply([*recent, min(recent) - lower], f, threshold) is rose_sharply(recent, f, threshold)


def test_rose_sharply_hand_examples():
    assert rose_sharply([0.001, 0.004, 0.002], 0.0161, 3.0)  # above four times the largest
    assert not rose_sharply([0.001, 0.004, 0.002], 0.0159, 3.0)
    assert not rose_sharply([], 1e300, 3.0)  # nothing to compare with yet
    assert not rose_sharply([0.001], 1e300, math.inf)  # off
    assert rose_sharply([0.001], math.inf, 3.0) and not rose_sharply([0.001], math.nan, 3.0)
    assert rose_sharply([math.nan, 0.001], 1.0, 3.0) and rose_sharply([0.001, math.nan], 1.0, 3.0)  # skipped
    assert rose_sharply([-2.0, -1.0], 2.0, 2.0) and not rose_sharply([-2.0, -1.0], 0.9, 2.0)  # |largest|


@all_rules
@given(q=quadratic_lines(), k=st.integers(-40, 40))
def test_every_rule_lowers_the_rate_on_an_uphill_line_and_the_ascent_hold_keeps_it(rule, q, k):
    # The mirror image of a convex quadratic line: g(a) = c + b a + h a^2 / 2 rises from a = 0,
    # its minimiser -b/h is negative, and every rule's target with it (property 4 of docs/math.md: D1 < 0
    # lowers the rate); for the Newton rules the factor clamp binds. The hold keeps the rate.
    # The loss is scaled by 2^k: the answers do not depend on it.
    options = RuleOptions(max_factor=2.0, alpha_min=1e-300, alpha_max=1e300)
    uphill = QuadLine(q.alpha, -q.b, q.h, q.c)
    f0, f1, d0, d1 = (2.0**k * v for v in uphill.measurements())
    assert d0 < 0.0 and d1 < 0.0
    proposal = rule(q.alpha, f0, f1, d0, d1, options)
    if rule is gen:
        # gen averages toward its (negative) parabola minimum: lowered, possibly by less than 2
        assert proposal.alpha < q.alpha
    else:
        assert proposal == Proposal(q.alpha / 2.0, Decision.CLAMPED)
    assert held_on_ascent(q.alpha, d0, proposal) == Proposal(q.alpha, Decision.ASCENT)


@all_rules
@given(q=quadratic_lines())
def test_the_ascent_hold_passes_every_downhill_proposal_through(rule, q):
    options = RuleOptions(alpha_min=1e-300, alpha_max=1e300)
    f0, f1, d0, d1 = q.measurements()
    proposal = rule(q.alpha, f0, f1, d0, d1, options)
    assert held_on_ascent(q.alpha, d0, proposal) is proposal


@given(alpha=log_uniform(1e-8, 1e2), d0=any_float, proposed=any_float, decision=st.sampled_from(list(Decision)))
def test_the_ascent_hold_only_ever_undoes_a_decrease_on_an_uphill_step(alpha, d0, proposed, decision):
    proposal = Proposal(proposed, decision)
    out = held_on_ascent(alpha, d0, proposal)
    if d0 < 0.0 and proposed < alpha:
        assert out == Proposal(alpha, Decision.ASCENT)
    else:  # NaN d0 or proposal, a rise, or a downhill step: the rule's answer stands
        assert out is proposal


def test_the_spike_test_hand_examples():
    assert not is_spike(2.0, 4.0, 1.0)  # rise 2 == 1 * |2|: not strictly above
    assert is_spike(2.0, 4.5, 1.0)
    assert is_spike(-2.0, 0.5, 1.0)  # negative losses: |f0|
    assert not is_spike(2.0, 1e300, math.inf)  # threshold inf: policy off
    assert not is_spike(2.0, math.nan, 1.0)  # non-finite: the non-finite guard's case


@given(alpha=any_float, options=rule_options())
def test_grown_rate_multiplies_by_max_factor_inside_the_bounds(alpha, options):
    out = grown_rate(alpha, options)
    assert math.isfinite(out.alpha) and options.alpha_min <= out.alpha <= options.alpha_max
    if math.isfinite(alpha) and alpha > 0:
        assert out == (clamp(alpha * options.max_factor, options), Decision.VANISHED)
    else:
        assert out == (options.alpha_min, Decision.NONFINITE)



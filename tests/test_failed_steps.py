"""A step that raises leaves nothing behind: the parameters, the rates and Newt's own state.

In every mode, a few good steps first (so that rates have adapted, the start has been tested,
a noise probe or a closure-free measurement is waiting), then a scheduler changes the rate, then
a step raises: in the closure's first or second call, in the inner optimizer's step, or in a
custom rule. Afterwards the parameters and every group's ``"lr"`` are bit for bit what they
were, and ``state_dict()["newt"]`` is as before, with one exception that one buffer cannot
avoid: once the failed step has taken its own snapshot of ``theta_t`` (every failure after the
first closure call), a measurement that needed the old contents of that buffer (the noise
probe, closure-free mode's last step) is dropped. The inner optimizer's own state is its own:
it advanced if its step ran, as it does for a rejected step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from newt import Newt

pytestmark = pytest.mark.usefixtures("one_thread")


class Boom(Exception):
    """The injected failure; nothing else raises it."""


def halfway(alpha, f0, f1, d0, d1, options):
    """A custom rule: half a Newton step with the slopes' curvature; raises when told to."""
    if halfway.raises:
        raise Boom("custom rule")
    curvature = d0 - d1
    return alpha if not curvature > 0 else alpha * (1.0 + 0.5 * d1 / curvature)


halfway.raises = False

MODES = {
    "lookahead": dict(closure=True),
    "lazy-plain": dict(closure=True, update_every=2),
    "lazy-lookahead": dict(closure=True, update_every=2),
    "per-group": dict(closure=True, per_group=True, strategy="retsinas"),
    "closure-free": dict(closure=False),
    "closure-free-loss": dict(closure=False, give_loss=True),
    "closure-free-blocks": dict(closure=False, give_loss=True, update_every=3),
}
FAILURES = ["first call", "second call", "inner step", "custom rule"]


def _cases():
    for mode, setup in MODES.items():
        for failure in FAILURES:
            if not setup["closure"] and failure in ("first call", "second call"):
                continue  # no closure: the loop's own forward pass never reaches Newt
            if mode == "lazy-plain" and failure in ("second call", "custom rule"):
                continue  # a plain step calls the closure once, and no rule
            if failure == "custom rule" and (not setup["closure"] or setup.get("per_group")):
                continue  # a custom rule needs the loss values
            yield pytest.param(mode, failure, id=f"{mode}-{failure}")


def _build(mode: str, failure: str):
    setup = dict(MODES[mode])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    groups = [{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias], "lr": 5e-3}]
    options = {k: setup[k] for k in ("update_every", "per_group", "strategy") if k in setup}
    if failure == "custom rule":
        options["strategy"] = halfway
    opt = Newt(torch.optim.Adam(groups, lr=1e-2), **options)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randn(16, 1, generator=gen)) for _ in range(8)
    ]
    return model, opt, batches, setup


def _step(model, opt, batch, setup, raising_call=None):
    x, y = batch
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y.double())
        loss.backward()
        if calls == raising_call:
            raise Boom(f"closure call {calls}")
        return loss

    if setup["closure"]:
        return opt.step(closure)
    loss = closure()
    return opt.step(loss=loss) if setup.get("give_loss") else opt.step()


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize(("mode", "failure"), list(_cases()))
def test_a_step_that_raises_leaves_the_parameters_the_rates_and_newts_state_as_they_were(mode, failure):
    model, opt, batches, setup = _build(mode, failure)
    good = {"lazy-plain": 5, "lazy-lookahead": 4}.get(mode, 4)  # lazy, K = 2: odd steps are plain
    for batch in batches[:good]:
        _step(model, opt, batch, setup)
    for group in opt.param_groups:
        group["lr"] *= 0.5  # a scheduler's change, which the failing step reads in
    theta = [p.detach().clone() for p in model.parameters()]
    lrs = [group["lr"] for group in opt.param_groups]
    newt_before = copy.deepcopy(opt.state_dict()["newt"])
    info_before = opt.step_info
    # a measurement waits on the buffer: the exception below is exercised
    assert newt_before["noise"]["probe"] is not None or newt_before["pending"] is not None

    raising_call = {"first call": 1, "second call": 2}.get(failure)
    halfway.raises = failure == "custom rule"
    if failure == "inner step":

        def raising_step(*args, **kwargs):
            raise Boom("inner step")

        opt.inner.step = raising_step
    try:
        with pytest.raises(Boom):
            _step(model, opt, batches[good], setup, raising_call)
    finally:
        halfway.raises = False
        opt.inner.__dict__.pop("step", None)

    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    assert [group["lr"] for group in opt.param_groups] == lrs
    assert opt.step_info is info_before
    expected = copy.deepcopy(newt_before)
    if failure != "first call":  # the step's own snapshot overwrote what these measurements needed
        expected["pending"] = None
        expected["noise"]["probe"] = None
    assert _same(opt.state_dict()["newt"], expected)


@pytest.mark.parametrize("mode", list(MODES))
def test_the_step_after_a_failed_one_works(mode):
    model, opt, batches, setup = _build(mode, "inner step")
    for batch in batches[:3]:
        _step(model, opt, batch, setup)
    with pytest.raises(Boom):
        _raise_in_inner_step(model, opt, batches[3], setup)
    steps = opt.state_dict()["newt"]["steps"]
    _step(model, opt, batches[4], setup)
    assert opt.state_dict()["newt"]["steps"] == steps + 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _raise_in_inner_step(model, opt, batch, setup):
    def raising_step(*args, **kwargs):
        raise Boom("inner step")

    opt.inner.step = raising_step
    try:
        _step(model, opt, batch, setup)
    finally:
        del opt.inner.step


def test_a_custom_rule_that_raises_on_the_first_step_leaves_the_start_on_probation():
    model, opt, batches, setup = _build("lookahead", "custom rule")
    assert opt.state_dict()["newt"]["start_proven"] is False
    halfway.raises = True
    try:
        with pytest.raises(Boom):
            _step(model, opt, batches[0], setup)
    finally:
        halfway.raises = False
    state = opt.state_dict()["newt"]
    assert state["start_proven"] is False and state["recent_losses"] == [] and state["steps"] == 0


def test_closure_free_an_inner_step_that_raises_leaves_the_rate_unchanged():
    model, opt, batches, setup = _build("closure-free-loss", "inner step")
    for batch in batches[:3]:
        _step(model, opt, batch, setup)
    lrs, adapted = [g["lr"] for g in opt.param_groups], opt.adapted_rates
    with pytest.raises(Boom):
        _raise_in_inner_step(model, opt, batches[3], setup)
    assert [g["lr"] for g in opt.param_groups] == lrs and opt.adapted_rates == adapted

"""Breaks found by attacking the public API, each pinned by a test: ordinary schedules at zero,
resumes with other options, aliased losses, bad groups and checkpoints, re-entrant steps, and
inner optimizers Newt cannot drive. Every test goes through the public API only.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from newt import CheckpointError, Decision, FactorLR, Newt, ScheduleWarning

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randn(16, 1, generator=gen)) for _ in range(n)
    ]


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y.double())
        loss.backward()
        return loss

    return closure


def _frozen_backbone(model: nn.Module, lr: float = 0.05):
    """A first param group with lr=0 (a frozen backbone listed first), then the trained head."""
    return [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters(), "lr": lr}]


@pytest.mark.parametrize(
    "schedule",
    [
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=4),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.0),
        lambda opt: FactorLR(opt, lambda step: min(1.0, step / 4)),  # a warm-up from 0
    ],
    ids=["linear-decay-to-0", "cosine-to-0", "warm-up-from-0"],
)
def test_a_frozen_first_group_and_a_schedule_that_reaches_zero_take_plain_steps(schedule):
    model = _model()
    opt = Newt(torch.optim.Adam(_frozen_backbone(model)))
    scheduler = schedule(opt)
    decisions = []
    for x, y in _batches(10):
        opt.step(_closure(opt, model, x, y))
        decisions.append(opt.step_info.decision)
        scheduler.step()
    assert Decision.PLAIN in decisions  # the steps at a factor of 0 measured nothing and kept the rates
    assert all(math.isfinite(g["lr"]) for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == 0.0  # the frozen group stays frozen


def test_per_group_rates_and_a_warm_up_from_zero_take_a_plain_first_step():
    model = _model()
    opt = Newt(torch.optim.Adam(model.parameters(), lr=0.01), per_group=True)
    scheduler = FactorLR(opt, lambda step: min(1.0, step / 3))
    decisions = []
    for x, y in _batches(6):
        opt.step(_closure(opt, model, x, y))
        decisions.append(opt.step_info.decision)
        scheduler.step()
    assert decisions[0] == Decision.PLAIN and set(decisions[1:]) - {Decision.PLAIN}


@pytest.mark.parametrize(("saved_k", "loaded_k"), [(4, 2), (8, 4), (4, 1)])
def test_closure_free_blocks_resumed_with_another_block_length_keep_adapting(saved_k, loaded_k):
    model, batches = _model(), _batches(20)
    opt = Newt(torch.optim.SGD(model.parameters(), lr=0.01), strategy="retsinas", update_every=saved_k)
    for x, y in batches[:saved_k]:  # mid-block: the first step measures nothing, then K - 1 of the block
        _closure(opt, model, x, y)()
        opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())
    resumed = Newt(torch.optim.SGD(model.parameters(), lr=0.01), strategy="retsinas", update_every=loaded_k)
    resumed.load_state_dict(checkpoint)
    decisions = []
    for x, y in batches[10:16]:
        _closure(resumed, model, x, y)()
        resumed.step()
        decisions.append(resumed.step_info.decision)
    assert decisions[0] != Decision.PLAIN  # the block is complete at once: the rate is adapted
    assert sum(d != Decision.PLAIN for d in decisions) >= len(decisions) // loaded_k


def test_a_closure_that_returns_a_float64_loss_buffer_it_overwrites_is_measured_right():
    model = _model()
    opt = Newt(torch.optim.Adam(model.parameters(), lr=0.01))
    buffer = torch.zeros((), dtype=torch.float64)
    infos = []
    for x, y in _batches(8):

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y.double())
            loss.backward()
            buffer.copy_(loss.detach())  # one buffer for every call, as some logging loops keep
            return buffer

        opt.step(closure)
        infos.append(opt.step_info)
    assert all(info.f0 != info.f1 for info in infos)
    assert not all(info.rejected for info in infos)


@pytest.mark.parametrize("lr", [math.nan, math.inf, -1.0, "fast"])
def test_a_param_group_with_a_bad_rate_is_refused_before_it_joins(lr):
    model = _model()
    opt = Newt(torch.optim.Adam(model[2].parameters(), lr=0.01))
    with pytest.raises(ValueError, match=r"param group 1 has lr="):
        opt.add_param_group({"params": model[0].parameters(), "lr": lr})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[0].parameters(), "lr": 0.001})  # not a duplicate: it never joined
    assert len(opt.param_groups) == 2


def _corrupted(kind: str, checkpoint: dict) -> dict:
    newt = checkpoint["newt"]
    if kind == "nan rate":
        newt["rates"][0][0] = math.nan
    elif kind == "zero rates":
        newt["rates"] = [[0.0, 1.0, 0.0] for _ in newt["rates"]]
    elif kind == "rates of other groups":
        newt["rates"] = newt["rates"] * 2
    elif kind == "nan noise average":
        newt["noise"]["averages"][0][1] = math.nan
    elif kind == "negative steps":
        newt["steps"] = -3
    elif kind == "snapshot of another model":
        newt["noise"]["probe"]["snapshot"] = [torch.zeros(3, 3) for _ in newt["noise"]["probe"]["snapshot"]]
    elif kind == "snapshot of other parameters":
        newt["noise"]["probe"]["indices"] = [0, 99]
    elif kind == "nan loss reference":
        newt["loss_reference"] = math.nan
    return checkpoint


@pytest.mark.parametrize(
    "kind",
    [
        "nan rate",
        "zero rates",
        "rates of other groups",
        "nan noise average",
        "negative steps",
        "snapshot of another model",
        "snapshot of other parameters",
        "nan loss reference",
    ],
)
def test_a_corrupt_checkpoint_is_refused_and_leaves_the_optimizer_as_it_was(kind):
    model = _model()
    opt = Newt(torch.optim.Adam(model.parameters(), lr=0.01))
    for x, y in _batches(4):
        opt.step(_closure(opt, model, x, y))
    good = copy.deepcopy(opt.state_dict())
    assert good["newt"]["noise"]["probe"] is not None and good["newt"]["noise"]["averages"]
    target = Newt(torch.optim.Adam(model.parameters(), lr=0.02))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(CheckpointError, match="checkpoint"):
        target.load_state_dict(_corrupted(kind, copy.deepcopy(good)))
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["newt"] == before["newt"]
    target.load_state_dict(good)  # the good one loads
    assert target.state_dict()["newt"]["steps"] == 4


def test_a_step_called_from_inside_its_own_closure_is_refused_and_theta_is_restored():
    model = _model()
    opt = Newt(torch.optim.Adam(model.parameters(), lr=0.01))
    x, y = _batches(1)[0]
    inner_closure = _closure(opt, model, x, y)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the lookahead call steps again
            opt.step(inner_closure)
        return inner_closure()

    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="from inside the closure"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    opt.step(inner_closure)  # the next step works
    assert opt.step_info is not None


def test_an_initial_rate_outside_the_bounds_is_refused_at_construction():
    model = _model()
    with pytest.raises(ValueError, match=r"largest initial learning rate is 1000.0, outside \[alpha_min, alpha_max\]"):
        Newt(torch.optim.SGD(model.parameters(), lr=1000.0), alpha_max=1.0)
    with pytest.raises(ValueError, match="outside"):
        Newt(torch.optim.SGD(model.parameters(), lr=1e-12))
    opt = Newt(torch.optim.SGD(model.parameters(), lr=0.5), alpha_max=1.0)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("inner", [torch.optim.Adam, torch.optim.SGD, torch.optim.AdamW])
def test_an_inner_optimizer_that_maximizes_is_refused_at_construction(inner):
    with pytest.raises(ValueError, match="maximize=True"):
        Newt(inner(_model().parameters(), lr=0.01, maximize=True))


def test_lbfgs_which_needs_a_closure_of_its_own_is_refused_at_construction():
    with pytest.raises(TypeError, match="LBFGS.step needs a closure"):
        Newt(torch.optim.LBFGS(_model().parameters(), lr=0.1))


def test_the_lookahead_replays_torchs_default_generator_not_a_generator_of_the_users():
    """A closure that draws its sub-batch from its own ``torch.Generator`` sees another draw in the
    lookahead call (the documented limit); drawn from torch's default generator it sees the same."""
    model = _model()
    opt = Newt(torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = _batches(1)[0]
    own = torch.Generator().manual_seed(0)
    for generator in (None, own):
        drawn = []

        def closure(generator=generator):
            index = torch.randperm(16, generator=generator)[:8]
            drawn.append(index)
            return _closure(opt, model, x[index], y[index])()

        opt.step(closure)
        assert torch.equal(drawn[0], drawn[1]) is (generator is None)


def test_a_schedule_that_keeps_writing_its_base_rate_is_reported_once_and_a_factor_schedule_is_not():
    for schedule, warns in (
        (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), True),
        (
            lambda opt: FactorLR(opt, lambda s: 1.0),
            False,
        ),
    ):
        model = _model()
        opt = Newt(torch.optim.Adam(model.parameters(), lr=0.01))
        scheduler = schedule(opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in _batches(8):
                opt.step(_closure(opt, model, x, y))
                scheduler.step()
        reported = [w for w in caught if issubclass(w.category, ScheduleWarning)]
        assert len(reported) == int(warns), schedule
        if warns:  # what it says is true: the schedule's value is not the rate applied
            assert scheduler.get_last_lr()[0] == 0.01 != opt.step_info.alpha
            assert "step_info.alpha" in str(reported[0].message)

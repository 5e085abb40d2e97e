"""The generalisation suite (``benchmarks/suite.py``): its fixed split, its tasks, its account."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import suite
from benchmarks.robustness import Job, Method, NewtStepper, run_on
from newt import Newt
from tests.test_benchmark_tasks import offline  # noqa: F401 - the fixture that blocks the network


def test_the_split_is_the_one_fixed_before_any_tuning():
    # Moving a task between the halves after seeing its results would void the held-out test:
    # this list is the split as first committed.
    halves = {half: sorted(n for n, e in suite.SUITE.items() if e.half == half) for half in suite.HALVES}
    assert halves == {
        "development": sorted(
            [
                "wine",
                "noisy-logistic",
                "friedman",
                "digits-cnn",
                "mnist1d-gru",
                "iris-full",
                "digits-offset",
                "cancer-long",
            ]
        ),
        "held-out": sorted(
            [
                "cancer-linear",
                "diabetes",
                "digits-hinge",
                "prose-lm",
                "moons-batch8",
                "blobs-zero",
                "digits-finetune",
                "digits-adamw",
            ]
        ),
    }


@pytest.mark.parametrize("name", sorted(suite.SUITE))
def test_every_task_loads_offline_builds_its_model_and_evaluates(name, offline):  # noqa: F811
    entry = suite.SUITE[name]
    data = entry.task.load()
    model = entry.task.model(0)
    x, y = data.sample(torch.Generator().manual_seed(0), entry.task.batch_size)
    loss = entry.task.loss(model(x), y)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    train_loss, metric = entry.task.evaluate(model, data)
    assert math.isfinite(train_loss) and math.isfinite(metric)
    assert entry.task.model(0).state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(entry.task.model(0).parameters(), model.parameters()))


def test_a_full_batch_is_the_whole_training_set_in_order():
    data = suite.iris()
    x, y = data.sample(torch.Generator().manual_seed(0), suite.SUITE["iris-full"].task.batch_size)
    assert torch.equal(x, data.x_train) and torch.equal(y, data.y_train)


def test_the_offset_loss_has_cross_entropys_gradient_and_its_value_plus_the_offset():
    torch.manual_seed(0)
    logits = torch.randn(16, 10, requires_grad=True)
    target = torch.randint(0, 10, (16,))
    plain = torch.nn.functional.cross_entropy(logits, target)
    (grad_plain,) = torch.autograd.grad(plain, logits)
    shifted = suite.offset_cross_entropy(logits, target)
    (grad_shifted,) = torch.autograd.grad(shifted, logits)
    assert float(shifted.detach()) == pytest.approx(float(plain.detach()) + suite.OFFSET)
    assert torch.equal(grad_plain, grad_shifted)


def test_the_fine_tuning_start_has_learned_the_first_task():
    model = suite.SUITE["digits-finetune"].task.model(0)
    x_train, y_train, _, _ = suite.digits()
    low = y_train < 5
    accuracy = float((model(x_train[low]).argmax(-1) == y_train[low]).float().mean())
    assert accuracy > 0.9  # trained on 0-4; the task then asks for 5-9


def test_a_run_reports_its_initial_loss_and_its_steps_at_a_rate_bound():
    result = suite.run_suite_job(Job("wine", "newt", 1e-3, 0, budget=20))
    assert result["steps"] == 15  # a step with a forward-only lookahead costs 4/3 evaluations
    assert math.isfinite(result["initial_loss"]) and result["initial_loss"] > result["train_loss"]
    assert result["steps_at_bound"] == 0  # from 1e-3 the rate stays far from 1e-10 and 1e4
    plain = suite.run_suite_job(Job("wine", "plain", 1e-3, 0, budget=20))
    assert plain["steps"] == 20 and plain["steps_at_bound"] == 0  # a plain optimizer has no bounds
    assert plain["initial_loss"] == result["initial_loss"]  # the same start for every method


def test_a_rate_held_at_its_bound_is_counted_at_every_step():
    # alpha_max at the initial rate: wine's rate wants to grow from 1e-3 (the rule keeps or grows
    # it on every one of these steps), so after every step it is the bound.
    def build(model, lr, context):
        opt = Newt(torch.optim.Adam(model.parameters(), lr=lr), alpha_max=lr, start_armijo=0.0)
        return NewtStepper(opt, closure_free=False)

    method = Method("capped", "capped", "newt", True, build)
    entry = suite.SUITE["wine"]
    result = run_on(entry.task, method, Job("wine", "capped", 1e-3, 0, budget=20))
    assert result["steps"] == 15 and result["steps_at_bound"] == 15


def _run(method, alpha0, loss, initial=1.0, metric=0.9, steps=10, at_bound=0):
    return {
        "method": method,
        "alpha0": alpha0,
        "seed": 0,
        "diverged": False,
        "train_loss": loss,
        "metric": metric,
        "initial_loss": initial,
        "steps": steps,
        "steps_at_bound": at_bound,
        "seconds": 1.0,
        "evals": 10,
    }


def test_the_targets_count_each_task_against_its_peers():
    # newt's worst start (0.2) beats every peer (best 0.3) and its mean (0.15) beats theirs; one run
    # ends above its initial loss; closure-free spends half its steps at a bound.
    runs = [_run("plain", a, 0.05 if a == 1e-2 else 2.0) for a in (1e-2, 1.0)]
    runs += [_run("newt", 1e-2, 0.1), _run("newt", 1.0, 0.2, initial=0.15)]
    runs += [_run("newt-free-loss", 1e-2, 0.5, at_bound=5), _run("newt-free-loss", 1.0, 0.6)]
    runs += [_run(peer, None, loss) for peer, loss in (("prodigy", 0.3), ("dadapt-adam", 0.4), ("dog", 0.5))]
    text = suite.targets({"wine": runs})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines() if "Newt" in line}
    closure, free = rows["Newt(Adam), closure"], rows["Newt(Adam), closure-free, loss="]
    assert [c.strip(" |") for c in closure] == ["1 of 1", "1 of 1", "0 of 1", "1 of 1", "1 of 1"]
    assert [c.strip(" |") for c in free] == ["0 of 1", "0 of 1", "1 of 1", "0 of 1", "1 of 1"]

"""Fast checks of the robustness sweep's pieces (``benchmarks/``): the tasks build and load
their data offline and deterministically, every method takes a step, and the gradient
evaluations are counted right in each ``Newt`` mode (checked against closure calls counted here).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import socket

import numpy
import pytest
import torch

from benchmarks import demo, overhead, peers, robustness, sharpness, tasks
from benchmarks.demo import _option
from benchmarks.peers import PassCounter
from benchmarks.robustness import METHODS, Job, NewtStepper, run
from newt import Newt

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a benchmark task tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_digits_loads_offline_and_deterministically(offline) -> None:
    first = tasks.digits.__wrapped__()  # bypass the cache: load twice for real
    assert _equal(first, tasks.digits.__wrapped__())
    x_train, y_train, x_test, y_test = first
    assert x_train.shape[1] == 64 and len(x_train) + len(x_test) == 1797
    assert not _equal(first, tasks.digits.__wrapped__(seed=1))  # the seed does choose the split


def test_mnist1d_generates_offline_and_deterministically(offline) -> None:
    first = tasks.mnist1d(num_samples=100)  # the generator, small: the default takes seconds
    assert _equal(first, tasks.mnist1d(num_samples=100))
    assert not _equal(first, tasks.mnist1d(num_samples=100, seed=7))
    x_train, y_train, x_test, y_test = first
    assert x_train.shape == (80, 1, 40) and x_test.shape == (20, 1, 40)
    assert x_train.dtype == torch.float32 and set(y_train.tolist()) <= set(range(10))


def test_char_corpus_is_the_stdlib_text_offline(offline) -> None:
    first = tasks.char_corpus()
    assert _equal(first, tasks.char_corpus())
    x_train, y_train, x_test, y_test = first
    assert x_train.shape[1] == 64 and torch.equal(x_train[:, 1:], y_train[:, :-1])
    assert len(x_train) > 5 * len(x_test) > 0 and int(x_train.max()) < 256
    assert tasks.stdlib_text.__wrapped__() == tasks.stdlib_text()


@pytest.mark.parametrize(
    ("builder", "x"),
    [
        (tasks.digits_mlp, torch.rand(5, 64)),
        (tasks.mnist1d_cnn, torch.randn(5, 1, 40)),
        (tasks.char_transformer, torch.randint(0, 256, (5, 64))),
    ],
)
def test_models_build_deterministically_and_take_a_newt_step(builder, x: torch.Tensor) -> None:
    model = builder(0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), builder(0).parameters()))
    out = model(x)
    y = torch.randint(0, out.shape[-1], out.shape[:-1])
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = tasks.loss_fn(model(x), y)
        loss.backward()
        return loss

    assert math.isfinite(float(opt.step(closure).detach()))


def test_charlm_is_causal() -> None:
    """A byte may only see the bytes before it: changing the last input changes no earlier output."""
    model = tasks.char_transformer(0).eval()
    x = torch.randint(0, 256, (2, 64))
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :-1], model(changed)[:, :-1])


def test_batches_are_deterministic() -> None:
    data = tasks.TASKS["charlm"].load()
    a = data.sample(torch.Generator().manual_seed(3), 4)
    b = data.sample(torch.Generator().manual_seed(3), 4)
    assert _equal(a, b) and torch.equal(a[0][:, 1:], a[1][:, :-1])


@pytest.mark.parametrize("key", sorted(METHODS))
def test_every_method_trains_within_a_tiny_budget(key: str) -> None:
    method = METHODS[key]
    result = run(Job("digits", key, 1e-2 if method.takes_alpha0 else None, 0, budget=6))
    assert 6 <= result["evals"] <= 8  # a lookahead step may overshoot the budget by one
    assert result["steps"] >= 3 and not result["diverged"]
    assert math.isfinite(result["train_loss"]) and 0.0 <= result["metric"] <= 1.0
    if key.startswith("gen-official"):
        assert result["parabola_calls"] == 1 and result["forwards"] == result["backwards"] + 3


@pytest.mark.parametrize(
    ("strategy", "options", "closure_free", "calls_per_8_steps", "backwards_per_8_steps"),
    [
        ("taylor", {}, False, 16, 16),  # lookahead: 2 closure calls every step
        ("gen", {"forward_only": False}, False, 16, 16),
        ("gen", {}, False, 16, 8),  # the default forward-only lookahead: its backward skipped
        ("gen-three-point", {}, False, 24, 8),  # and the call behind theta_t: forward only too
        ("taylor", {"update_every": 4}, False, 10, 10),  # lazy K=4: 2 on steps 0 and 4, else 1
        ("retsinas", {"update_every": 4}, False, 10, 10),
        ("retsinas", {}, True, 8, 8),  # closure-free: one backward per step, done by the loop
        ("gen", {}, True, 8, 8),
    ],
)
def test_gradient_evaluations_match_the_closure_calls(
    strategy, options, closure_free, calls_per_8_steps, backwards_per_8_steps
) -> None:
    x, y = tasks.digits()[:2]
    model = tasks.digits_mlp(0)
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3), strategy=strategy, **options)
    stepper = NewtStepper(opt, closure_free)
    counter = PassCounter(model)
    calls = 0

    def batch_loss() -> torch.Tensor:
        nonlocal calls
        calls += 1
        return counter.watch(tasks.loss_fn(model(x[:32]), y[:32]))

    for _ in range(8):
        stepper.step(batch_loss)
    assert calls == counter.forwards == calls_per_8_steps and counter.backwards == backwards_per_8_steps
    forward_only = calls - backwards_per_8_steps
    assert counter.cost == pytest.approx(backwards_per_8_steps + forward_only / 3.0)


@pytest.mark.parametrize(
    ("key", "steps"),
    [
        ("newt-adam-taylor", 10),
        ("newt-adam-taylor-lazy4", 16),
        ("newt-adam-gen-free", 20),
        ("newt-adam-retsinas-free-loss", 20),
        ("adam", 20),
    ],
)
def test_an_equal_budget_means_fewer_steps_for_the_lookahead(key: str, steps: int) -> None:
    result = run(Job("digits", key, 1e-3, 0, budget=20))
    assert result["evals"] == 20 and result["steps"] == steps


def test_the_closure_free_rows_with_a_loss_give_it_to_the_step_and_only_they_do() -> None:
    for key, label in (("newt-sgd-gen-free-loss", "closure-free, loss="), ("newt-sgd-gen-free", "closure-free")):
        stepper = METHODS[key].build(torch.nn.Linear(2, 1), 1e-3, None)
        given = []
        original_step = stepper.optimizer.step

        def recording_step(*args, original_step=original_step, given=given, **kwargs):
            given.append(kwargs.get("loss"))
            return original_step(*args, **kwargs)

        stepper.optimizer.step = recording_step
        weight = stepper.optimizer.param_groups[0]["params"][0]
        stepper.step(lambda: (weight.sum() - 1.0) ** 2)
        assert stepper.closure_free and METHODS[key].label.endswith(label)
        assert (given[0] is not None) == key.endswith("-loss"), key


def test_a_no_grad_forward_costs_a_third() -> None:
    model = tasks.digits_mlp(0)
    counter = PassCounter(model)
    x = torch.rand(4, 64)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    counter.watch(model(x).sum()).backward()
    assert (counter.forwards, counter.backwards) == (4, 1)
    assert counter.cost == pytest.approx(1 + 3 * peers.FORWARD_ONLY_COST) == pytest.approx(2.0)
    counter.close()
    model(x)
    assert counter.forwards == 4


def test_the_table_ranks_by_the_worst_initial_rate() -> None:
    runs = [
        run(Job("digits", key, alpha0, 0, budget=8))
        for key, alpha0s in (("adam", (1e-5, 1e-2)), ("newt-adam-taylor", (1e-5, 1e-2)), ("prodigy", (None,)))
        for alpha0 in alpha0s
    ]
    text = robustness.table(tasks.TASKS["digits"], runs, [1e-5, 1e-2], 1, 8)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "α0=" not in line]
    assert len(rows) == 3
    worst = [float(row.split(" | ")[4]) for row in rows]
    assert worst == sorted(worst)
    assert "Best tuned plain optimizer: Adam" in text


def _curve_run(method: str, alpha0: float | None, loss: list[float | None]) -> dict:
    return {
        "method": method,
        "alpha0": alpha0,
        "seed": 0,
        "curve": {"evals": list(range(1, len(loss) + 1)), "loss": loss, "rate": [1e-3] * len(loss)},
    }


def test_the_plot_clips_a_diverging_run_and_marks_it() -> None:
    runs = [
        _curve_run("adam", 1e-2, [2.0, 1.0, 0.5]),
        _curve_run("adam", 1.0, [2.5, 4e4, None]),  # diverged: huge, then NaN (None in the JSON)
        _curve_run(robustness.DEFAULT_NEWT, 1e-2, [2.2, 0.8, 0.4]),
        _curve_run("prodigy", None, [2.1, 1.5, 1.0]),
    ]
    fig = robustness.figure(tasks.TASKS["digits"], runs)
    ax_loss = fig.axes[0]
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels == ["Adam α0=0.01", "Adam α0=1 (off the chart)", "Newt α0=0.01", "Prodigy"]
    top = robustness.CLIP * 2.15  # the median of the first losses 2.0, 2.1, 2.2, 2.5
    assert ax_loss.get_ylim()[1] == pytest.approx(1.05 * top)
    drawn = [line.get_ydata() for line in ax_loss.get_lines() if len(line.get_ydata()) == 3]
    assert max(max(y[~numpy.isnan(y)]) for y in map(numpy.asarray, drawn)) == pytest.approx(top)
    # Every α0 has its own colour; Adam and Newt from the same α0 share it.
    colors = {line.get_label(): line.get_color() for line in ax_loss.get_lines() if line.get_label()[0] != "_"}
    assert colors["Adam α0=0.01"] == colors["Newt α0=0.01"] != colors["Adam α0=1 (off the chart)"]


def test_the_main_job_writes_only_under_an_ignored_folder_by_default() -> None:
    import subprocess

    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: nothing is ignored")

    for module in (robustness, demo):
        defaults = [a.default for a in module.arguments()._actions if isinstance(a.default, pathlib.Path)]
        assert defaults, module.__name__
        for path in defaults:
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path / "x.png")], cwd=ROOT)
            assert ignored.returncode == 0, f"{module.__name__} writes to {path}, which git does not ignore"


def test_ablations_run_only_when_a_pattern_names_their_tag() -> None:
    everything = robustness.select_methods(["*"])
    assert not any(METHODS[key].ablation for key in everything)
    spike = robustness.select_methods(["newt-sgd-taylor-st*"])
    assert spike == ["newt-sgd-taylor-st0.1", "newt-sgd-taylor-st0.5", "newt-sgd-taylor-st1"]
    stepper = METHODS["newt-sgd-taylor-st0.5"].build(torch.nn.Linear(1, 1), 0.1, None)
    assert stepper.optimizer.policies.spike_threshold == 0.5 and stepper.optimizer.policies.noise_correction == 0.5
    smoothing = robustness.select_methods(["newt-adam-*-sm*"])
    assert smoothing == ["newt-adam-gen-sm0.8", "newt-adam-gen-sm0.95"]  # gen's option only
    stepper = METHODS["newt-adam-gen-sm0.8"].build(torch.nn.Linear(1, 1), 0.1, None)
    assert stepper.optimizer.options.smoothing == 0.8 and stepper.optimizer.options.gamma == 0.5
    assert "gen" in repr(stepper.optimizer)
    lazy = robustness.select_methods(["newt-adam-gen-ue*"])
    assert lazy == ["newt-adam-gen-ue2", "newt-adam-gen-ue8"]
    assert METHODS["newt-adam-gen-ue8"].label == "Newt(Adam) gen, lazy K=8"
    assert METHODS["newt-adam-gen-ue8"].build(torch.nn.Linear(1, 1), 0.1, None).optimizer.update_every == 8
    damping = robustness.select_methods(["newt-*-retsinas-free-ga*"])
    assert damping == [f"newt-{inner}-retsinas-free-ga{g}" for inner in ("adam", "sgd") for g in ("0.25", "1")]
    stepper = METHODS["newt-sgd-retsinas-free-ga1"].build(torch.nn.Linear(1, 1), 0.1, None)
    assert stepper.closure_free and not stepper.give_loss and stepper.optimizer.options.gamma == 1.0
    blocks = robustness.select_methods(["newt-adam-*-free-loss-ue*"])
    assert blocks == ["newt-adam-retsinas-free-loss-ue4", "newt-adam-gen-free-loss-ue4"]
    assert METHODS["newt-adam-gen-free-loss-ue4"].label == "Newt(Adam) gen, closure-free, loss=, update_every=4"
    stepper = METHODS["newt-adam-gen-free-loss-ue4"].build(torch.nn.Linear(1, 1), 0.1, None)
    assert stepper.closure_free and stepper.give_loss and stepper.optimizer.update_every == 4
    assert "newt-adam-gen-free-ue4" not in robustness.select_methods(["newt-*-free*"])  # named by its tag only


def test_the_demo_passes_extra_newt_options_as_python_literals():
    parser = argparse.ArgumentParser()
    assert _option("hold_on_ascent=False", parser) == ("hold_on_ascent", False)
    assert _option("spike_threshold=0.5", parser) == ("spike_threshold", 0.5)
    for bad in ("hold_on_ascent", "=1", "x=not a literal"):
        with pytest.raises(SystemExit):
            _option(bad, parser)


def test_the_overhead_benchmark_times_every_mode_and_counts_one_snapshot_each(capsys):
    overhead.measure("mlp", repeats=1)
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "ms |" in line]
    methods = [
        "bare Adam",
        "forward and backward",
        "forward pass",
        "Newt lookahead",
        "Newt lookahead, no NaN check",
        "Newt lookahead gen, forward only",
        "Newt gen-three-point",
        "Newt gen-exact",
        "Newt lazy K=4",
        "Newt gen-exact lazy K=4",
        "Newt closure-free",
        "Newt closure-free, no NaN check",
        "Newt closure-free K=4",
    ]
    assert [row[0] for row in rows] == [f"| {method}" for method in methods]
    assert all(float(row[2]) > 0 for row in rows) and float(rows[0][2]) == 1.0  # ratios to the bare step
    assert "a forward pass costs" in out
    buffers = dict(
        line.removeprefix("parameter-sized buffers held by ").rsplit(": ", 1)
        for line in out.splitlines()
        if line.startswith("parameter-sized buffers held by")
    )
    # the strategies that visit a point off the lookahead keep the lookahead point in a second buffer
    two = {"Newt gen-three-point", "Newt gen-exact", "Newt gen-exact lazy K=4"}
    assert buffers == {m: "2.00" if m in two else "1.00" for m in methods if m.startswith("Newt")}


@pytest.mark.skipif(overhead.HEAP_BYTES is None, reason="the CPU peak memory reads glibc's mallinfo2")
def test_the_overhead_benchmarks_cpu_peak_memory_sees_the_snapshot_and_nothing_much_else():
    # The MLP's float32 weights: Newt's one extra buffer, its snapshot, is this size. Its
    # peak must be above the bare run's by at least that (a reader that missed allocations
    # would not see it), and by less than four such buffers (a second buffer, or parameter-sized
    # temporaries kept alive, would show).
    weights = 19_210 * 4
    overhead.peak_memory("mlp", "bare Adam", "cpu")  # first-use caches
    bare = overhead.peak_memory("mlp", "bare Adam", "cpu")
    assert bare > 10 * weights  # model, gradients, Adam's two moments and a batch's activations
    for method in ("Newt lookahead", "Newt lazy K=4", "Newt closure-free", "Newt closure-free K=4"):
        extra = overhead.peak_memory("mlp", method, "cpu") - bare
        assert 0.9 * weights <= extra < 4 * weights, (method, extra / weights)
    # gen-three-point holds the lookahead point while it evaluates theta_t + d: a second buffer, and
    # a forward-only lookahead allocates no gradients there (no more than the lookahead's)
    extra = overhead.peak_memory("mlp", "Newt gen-three-point", "cpu") - bare
    assert 1.9 * weights <= extra < 5 * weights, extra / weights
    forward = overhead.peak_memory("mlp", "Newt lookahead gen, forward only", "cpu")
    assert forward <= overhead.peak_memory("mlp", "Newt lookahead", "cpu")


@pytest.mark.parametrize(("task", "parameters"), [("transformer", 478_720), ("transformer-large", 19_307_776)])
def test_the_overhead_models_have_the_sizes_the_docs_give(task, parameters):
    model, _ = overhead.TASKS[task]("cpu")
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.slow
def test_the_trainer_benchmark_undoes_the_start_at_1_under_newt_trainer_only(offline) -> None:
    pytest.importorskip("transformers")
    from benchmarks import trainer_starts

    plain = trainer_starts.train("Newt(AdamW), Trainer", 1.0, steps=6, seed=0)
    given = trainer_starts.train("Newt(AdamW), NewtTrainer", 1.0, steps=6, seed=0)
    assert plain[2] == 0 and given[2] >= 1  # steps undone
    assert given[1] < plain[1]  # held-out loss after 6 steps
    assert given[3] < plain[3]  # the final rate: a tenfold cut when the start was undone


def test_the_sharpness_probe_matches_the_eigenvalues_of_a_quadratic() -> None:
    """On ``0.5 z^T A z`` the Hessian is ``A``: power iteration finds its eigenvalue of largest
    magnitude (as ``torch.linalg.eigvalsh`` computes it), and the curvature along a direction is
    its Rayleigh quotient, across parameters of several shapes."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    a = basis @ torch.diag(torch.tensor([-9.0, 3.0, 1.0, 0.5, -0.2, 0.1], dtype=torch.float64)) @ basis.T
    x = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        z = torch.cat([x, w.reshape(-1)])
        return 0.5 * z @ a @ z

    eigenvalues = torch.linalg.eigvalsh(a)
    expected = float(eigenvalues[eigenvalues.abs().argmax()])  # -9: the sign is kept
    gradient = sharpness.gradient_graph(loss, [x, w])
    assert sharpness.top_eigenvalue(gradient, [x, w]) == pytest.approx(expected, rel=1e-9)
    direction = [
        torch.randn(4, generator=generator, dtype=torch.float64),
        torch.randn(2, 1, generator=generator, dtype=torch.float64),
    ]
    flat = torch.cat([direction[0], direction[1].reshape(-1)])
    along = sharpness.curvature_along(gradient, [x, w], direction)
    assert along == pytest.approx(float(flat @ a @ flat / (flat @ flat)))


def test_the_sharpness_trace_measures_without_disturbing_the_run() -> None:
    """A probe restores the parameters it measured at: the run goes on as if unprobed (step 3 reads
    the same with and without a probe at step 1), and the momentum limit applies to SGD only."""
    probed, momentum = sharpness.trace("digits", "newt-sgd-gen", 1e-2, 0, 4, {1, 3})
    unprobed, _ = sharpness.trace("digits", "newt-sgd-gen", 1e-2, 0, 4, {3})
    assert [r["step"] for r in probed] == [1, 3] and probed[1] == unprobed[0]
    assert all(math.isfinite(r["lambda_max"]) and r["lambda_max"] != 0.0 for r in probed)
    assert momentum == 0.9 and sharpness.trace("digits", "newt-adam-gen", 1e-2, 0, 2, set())[1] is None


def test_the_forward_cost_benchmark_times_a_forward_pass_below_a_forward_and_backward_pass():
    from benchmarks import forward_cost
    from benchmarks.robustness import TASKS

    forward, both, share = forward_cost.ratio(TASKS["digits"], repeats=3)
    assert 0.0 < forward < both and share == pytest.approx(forward / both)

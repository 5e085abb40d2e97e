"""The robustness sweep: final training loss from six decades of initial learning rates, for the
plain inner optimizers, ``Newt`` in every strategy and mode, and the learning-rate-free peers,
at an equal budget of gradient evaluations.

Quick version (the README's main job; about 3 minutes on 2 busy CPU cores)::

    python -m benchmarks.robustness --quick

All three tasks with small budgets, one seed, initial rates 1e-5, 1e-2 and 1, and four methods:
plain Adam, ``Newt(Adam)`` with the default options, Prodigy and DoG. It prints one table per
task and writes its results and ``robustness-quick-<task>.png`` under ``benchmarks/results/``
(ignored by git); ``--plots docs/img`` regenerates the documentation's figures instead.

Full sweep (long: see "Runtime" below)::

    python -m benchmarks.robustness                      # every task, method, rate, 3 seeds
    python -m benchmarks.robustness --tasks digits       # one task
    python -m benchmarks.robustness --jobs 2             # runs in parallel processes

What is measured, per task (``benchmarks/tasks.py``) and run (method, initial rate α0, seed):

- the run trains until it has spent ``--budget`` gradient evaluations (default: the task's),
  counted by hooks on the model and the loss (``benchmarks.peers.PassCounter``), not by the
  methods: a forward pass without a backward costs a third (``benchmarks/forward_cost.py``
  measures the ratio per model), so a ``Newt`` step with ``gen``'s forward-only lookahead (the
  default) costs 1.33, one that measures the lookahead's gradient 2, a lazy one (K=4) 1.08
  on average with ``gen`` and 1.25 with the gradient measured, a closure-free one 1; GeN's
  official ``lr_parabola`` three forward passes, ``gen-three-point`` 1.67 a step. ``gen-exact``
  is counted 2.33 (its call at ``theta_t`` as one evaluation, although its double backward
  costs more: the overhead benchmark times it). A run whose parameters turn NaN stops early (it
  "diverged");
- the final training loss (the whole training set, eval mode, no grad) and the test metric
  (accuracy; bits per byte for the language model);
- the training wall clock in seconds (evaluation excluded), one thread per run.

Each task's table has one row per method: the final training loss at each α0 (mean over
seeds), the mean ± std of those losses across the α0 grid (the metric of Retsinas et al.;
population std; a method that takes no α0 shows ± 0), the worst α0's loss and the test metric
there, the ratio of the worst loss to the best tuned plain optimizer's loss (the best plain
SGD or Adam over the grid), and the mean gradient evaluations, optimizer steps and seconds
per run. Rows are ranked by the worst-α0 loss at the equal gradient-evaluation budget (the
wall-clock column is reported, not equalised). Under each table: where the default ``Newt``
stands against its targets (docs/benchmarks.md, "The targets").

Outputs: ``<out>/robustness[-quick]-<task>.json`` (every run, with its downsampled curves),
``<out>/robustness[-quick]-<task>.md`` (the table), and ``<plots>/robustness[-quick]-<task>.png``
(mini-batch loss against gradient evaluations; the rates of ``Newt`` per α0, log scale).

Runtime, measured on 2 CPU cores shared with two other busy processes (so about half speed),
one process, one thread: the quick version 2 min 51 s (161 s of training runs); the full digits
sweep (24 methods, 6 rates, 3 seeds: 387 runs of 700 gradient evaluations) 9.6 min. Estimated
from measured per-run times (12 s and 45 s): MNIST-1D (387 runs of 1500 evaluations) about 1.3
hours, the language model (387 runs of 800 evaluations of a 137k-parameter transformer) about
5 hours. ``--jobs 2`` nearly halves these on an idle 2-core machine (the seconds column then
includes contention between the processes).
``--replot`` rebuilds the tables and plots from the saved results without training.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from benchmarks.peers import (
    DAdaptAdamStepper,
    DoGStepper,
    GeNOfficialStepper,
    PassCounter,
    ProdigyStepper,
    ScheduleFreeStepper,
    Stepper,
)
from benchmarks.tasks import TASKS, Task, corpus_fingerprint
from newt import Newt

RATES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
QUICK_RATES = (1e-5, 1e-2, 1.0)
QUICK_METHODS = ("adam", "newt-adam-gen", "prodigy", "dog")
ABLATIONS = {
    "nc": ("noise_correction", (0.0, 0.25, 1.0), ("taylor", "gen")),
    "st": ("spike_threshold", (0.1, 0.5, 1.0), ("taylor", "gen")),
    "sa": ("start_armijo", (0.0, 0.05, 0.3), ("taylor", "gen")),
    "ah": ("hold_on_ascent", (False,), ("taylor", "gen")),
    "sm": ("smoothing", (0.8, 0.95), ("gen",)),
    "sh": ("shrink", (0.3, 0.5), ("gen",)),
    "mf": ("max_factor", (1.5, 4.0), ("gen",)),
    "ue": ("update_every", (2, 8), ("gen",)),
}
"""Other values of a default option (noise_correction 0.5, spike_threshold 0.2, start_armijo 0.1,
hold_on_ascent True, smoothing 0.9, shrink 0.1, max_factor 2, update_every 1), for the strategies
listed: methods ``newt-<inner>-<strategy>-<tag><value>`` (``ah0``: the hold off), run only when a
pattern names their tag (``-nc``, ``-st``, ``-sa``, ``-ah``, ``-sm``, ``-sh``, ``-mf`` or
``-ue``). Lookahead mode, except ``update_every`` > 1 (lazy mode; K = 4 is its own row)."""
FREE_ABLATIONS = {
    "ga": ("gamma", (0.25, 1.0), ("retsinas",)),
    "ue": ("update_every", (4,), ("retsinas", "gen")),
}
"""The same for closure-free mode (gamma 0.5: the damping of ``retsinas``, which the default
strategy uses there; update_every 1: blocks of K steps synchronise with the host once per block,
which is what a GPU notices): methods ``newt-<inner>-<strategy>-free-<tag><value>``, and
``newt-<inner>-<strategy>-free-loss-<tag><value>`` given the loss (``step(loss=...)``)."""
DEFAULT_NEWT = "newt-adam-gen"
CURVE_POINTS = 200  # points kept per curve in the results file (a moving average in between)

INNER: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
}
INNER_LABEL = {"adam": "Adam", "sgd": "SGD(m=0.9)"}
MODE_LABELS = {
    "": "lookahead",
    "-lazy4": "lazy K=4",
    "-grad": "lookahead, gradient measured",
    "-free": "closure-free",
    "-free-loss": "closure-free, loss=",
}
"""The modes, by their suffix in the method keys (``-free-loss``: closure-free with ``step(loss=...)``)."""


class NewtStepper(Stepper):
    """``Newt`` around an inner optimizer: ``opt.step(closure)``, or closure-free after backward
    (``opt.step()``, or ``opt.step(loss=loss)`` with ``give_loss``)."""

    def __init__(self, opt: Newt, closure_free: bool, give_loss: bool = False) -> None:
        super().__init__(opt)
        self.closure_free = closure_free
        self.give_loss = give_loss

    def step(self, batch_loss: Callable[[], torch.Tensor]) -> float:
        if self.closure_free and self.give_loss:
            self.optimizer.zero_grad()
            loss = batch_loss()
            loss.backward()
            self.optimizer.step(loss=loss)
            return float(loss.detach())
        if self.closure_free:
            return super().step(batch_loss)  # loss.backward(); opt.step()
        opt = self.optimizer

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = batch_loss()
            loss.backward()
            return loss

        return float(opt.step(closure).detach())  # the closure's loss at theta_t, still attached

    def summary(self) -> dict[str, Any]:
        return {"rejected": int(self.optimizer.state_dict()["newt"]["rejected"])}

    def rate_bounds(self) -> tuple[float, float]:
        """The bounds Newt keeps its rate in (a run pinned at one is a finding)."""
        return self.optimizer.options.alpha_min, self.optimizer.options.alpha_max


@dataclass(frozen=True)
class Context:
    """What a method may need besides the model and α0."""

    budget: float
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # the training batches (GeN's tr_iter)


@dataclass(frozen=True)
class Method:
    """A row of the table: how to build its stepper, and whether it takes an initial rate."""

    key: str
    label: str
    family: str  # "plain", "newt" or "peer"
    takes_alpha0: bool
    build: Callable[[nn.Module, float, Context], Stepper]
    lr_free: bool = False  # a learning-rate-free peer (the targets compare against these)
    ablation: str | None = None  # a variant of a default option (its tag): run only when asked for by name


def _methods() -> dict[str, Method]:
    """Every row: plain SGD/Adam, Newt per strategy and mode around each, and the peers."""
    methods: list[Method] = []
    for inner, label in INNER_LABEL.items():
        make = INNER[inner]
        methods.append(
            Method(inner, label, "plain", True, lambda m, lr, c, make=make: Stepper(make(m.parameters(), lr)))
        )
        for strategy in ("taylor", "retsinas", "gen", "gen-three-point", "gen-exact"):
            modes = [("", {}, False), ("-lazy4", {"update_every": 4}, False)]
            if strategy in ("retsinas", "gen"):  # the others call the closure again: no closure-free mode
                modes += [("-free", {}, True), ("-free-loss", {}, True)]
            if strategy == "gen":  # the lookahead's gradient measured, the default before forward-only
                modes += [("-grad", {"forward_only": False}, False)]
            for suffix, options, free in modes:
                mode = MODE_LABELS[suffix]

                def build(m, lr, c, make=make, strategy=strategy, options=options, free=free, suffix=suffix) -> Stepper:
                    opt = Newt(make(m.parameters(), lr), strategy=strategy, **options)
                    return NewtStepper(opt, free, give_loss=suffix == "-free-loss")

                methods.append(
                    Method(f"newt-{inner}-{strategy}{suffix}", f"Newt({label}) {strategy}, {mode}", "newt", True, build)
                )
        ablations = [(tag, *entry, "") for tag, entry in ABLATIONS.items()]
        ablations += [
            (tag, *entry, suffix) for tag, entry in FREE_ABLATIONS.items() for suffix in ("-free", "-free-loss")
        ]
        for tag, option, values, strategies, suffix in ablations:
            for strategy in strategies:
                for value in values:

                    def build(m, lr, c, make=make, strategy=strategy, option=option, value=value, suffix=suffix):
                        opt = Newt(make(m.parameters(), lr), strategy=strategy, **{option: value})
                        return NewtStepper(opt, suffix != "", give_loss=suffix == "-free-loss")

                    if suffix:
                        mode = f"{MODE_LABELS[suffix]}, {option}={value:g}"
                    elif option == "update_every":
                        mode = f"lazy K={value:g}"
                    else:
                        mode = f"lookahead, {option}={value:g}"
                    methods.append(
                        Method(
                            f"newt-{inner}-{strategy}{suffix}-{tag}{value:g}",
                            f"Newt({label}) {strategy}, {mode}",
                            "newt",
                            True,
                            build,
                            ablation=f"-{tag}",
                        )
                    )
        methods.append(
            Method(
                f"gen-official-{inner}",
                f"GeN official ({label}), lazy 4",
                "peer",
                True,
                lambda m, lr, c, make=make: GeNOfficialStepper(make(m.parameters(), lr), m, c.batches),
            )
        )
    methods += [
        Method(
            "sf-adamw",
            "Schedule-Free AdamW",
            "peer",
            True,
            lambda m, lr, c: ScheduleFreeStepper(m.parameters(), lr, warmup_steps=max(1, int(0.05 * c.budget))),
        ),
        Method("prodigy", "Prodigy", "peer", False, lambda m, lr, c: ProdigyStepper(m.parameters()), lr_free=True),
        Method(
            "dadapt-adam",
            "D-Adapt Adam",
            "peer",
            False,
            lambda m, lr, c: DAdaptAdamStepper(m.parameters()),
            lr_free=True,
        ),
        Method("dog", "DoG (averaged)", "peer", False, lambda m, lr, c: DoGStepper(m), lr_free=True),
    ]
    return {method.key: method for method in methods}


METHODS = _methods()


# ---------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    """One training run: a method on a task from one initial rate and seed, with a budget."""

    task: str
    method: str
    alpha0: float | None  # None: the method takes no initial rate
    seed: int
    budget: float


def batch_generator(seed: int) -> torch.Generator:
    """The generator of a seed's batch sequence: every method with that seed sees the same batches."""
    return torch.Generator().manual_seed(10_000 + seed)


def run(job: Job) -> dict[str, Any]:
    """Train one method from one initial rate until the budget is spent; evaluate; time it."""
    return run_on(TASKS[job.task], METHODS[job.method], job)


def run_on(task: Task, method: Method, job: Job) -> dict[str, Any]:
    """:func:`run` with the task and the method given (``job`` names them in the results)."""
    data = task.load()
    model = task.model(job.seed)
    # The same initialisation and the same batch sequence for every method with a given seed.
    batches = batch_generator(job.seed)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return data.sample(batches, task.batch_size)

    context = Context(budget=job.budget, batches=iter(draw, None))
    initial_loss, _ = task.evaluate(model, data)
    stepper = method.build(model, job.alpha0 if job.alpha0 is not None else math.nan, context)
    counter = PassCounter(model)  # after build: DoG's averager copies the model, hooks and all
    losses: list[float] = []
    rates: list[float] = []
    costs: list[float] = []
    diverged = False
    model.train()
    stepper.train()
    start = time.perf_counter()
    while counter.cost < job.budget:
        x, y = draw()
        loss = stepper.step(lambda: counter.watch(task.loss(model(x), y)))
        losses.append(loss)
        rates.append(stepper.rate())
        costs.append(counter.cost)
        if not math.isfinite(loss) and not all(bool(p.isfinite().all()) for p in model.parameters()):
            diverged = True  # NaN parameters never recover: stop spending the budget
            break
    seconds = time.perf_counter() - start
    counter.close()
    stepper.eval()
    train_loss, metric = task.evaluate(stepper.eval_model(model), data)
    diverged = diverged or not math.isfinite(train_loss)
    bounds = stepper.rate_bounds() if hasattr(stepper, "rate_bounds") else None
    at_bound = sum(1 for r in rates if bounds and (r <= bounds[0] or r >= bounds[1]))
    return {
        **asdict(job),
        "train_loss": None if diverged else train_loss,
        "metric": metric if math.isfinite(metric) else None,
        "diverged": diverged,
        "evals": counter.cost,
        "forwards": counter.forwards,
        "backwards": counter.backwards,
        "steps": len(losses),
        "seconds": seconds,
        "final_rate": rates[-1] if rates else None,
        "initial_loss": initial_loss,
        "steps_at_bound": at_bound,
        **stepper.summary(),
        "curve": _curve(costs, losses, rates),
    }


def _curve(costs: list[float], losses: list[float], rates: list[float]) -> dict[str, list]:
    """At most CURVE_POINTS points: the mean loss of each window, the rate at its end."""
    k = max(1, math.ceil(len(losses) / CURVE_POINTS))
    out: dict[str, list] = {"evals": [], "loss": [], "rate": []}
    for i in range(0, len(losses), k):
        window = losses[i : i + k]
        out["evals"].append(costs[i + len(window) - 1])
        out["loss"].append(_finite(sum(window) / len(window)))
        out["rate"].append(_finite(rates[i + len(window) - 1]))
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or inf


def _init_worker() -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------- the table


class OverStarts:
    """The figures over the starts of a row whose ``loss_at`` maps α0 to the mean final training
    loss over the seeds (inf: diverged): the mean over α0, the worst α0 and its loss."""

    loss_at: dict[float | None, float]

    @property
    def losses(self) -> list[float]:
        return list(self.loss_at.values())

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses) if all(map(math.isfinite, self.losses)) else math.inf

    @property
    def worst_alpha0(self) -> float | None:
        return max(self.loss_at, key=lambda a: self.loss_at[a])

    @property
    def worst(self) -> float:
        return self.loss_at[self.worst_alpha0]


@dataclass
class Row(OverStarts):
    method: Method
    loss_at: dict[float | None, float]
    metric_at: dict[float | None, float]
    evals: float
    steps: float
    seconds: float

    @property
    def std(self) -> float:
        return statistics.pstdev(self.losses) if all(map(math.isfinite, self.losses)) else math.nan


def per_alpha0(runs: list[dict[str, Any]]) -> tuple[dict[float | None, float], dict[float | None, float]]:
    """One method's runs: per α0, the final training loss (inf: diverged) and the test metric, means over seeds."""
    loss_at: dict[float | None, float] = {}
    metric_at: dict[float | None, float] = {}
    for alpha0 in dict.fromkeys(r["alpha0"] for r in runs):
        seeds = [r for r in runs if r["alpha0"] == alpha0]
        loss_at[alpha0] = statistics.fmean(math.inf if r["diverged"] else r["train_loss"] for r in seeds)
        metrics = [r["metric"] for r in seeds if r["metric"] is not None]
        metric_at[alpha0] = statistics.fmean(metrics) if metrics else math.nan
    return loss_at, metric_at


def summarize(runs: list[dict[str, Any]]) -> list[Row]:
    """One row per method, ranked by the worst-α0 final training loss."""
    rows = []
    for key in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == key]
        loss_at, metric_at = per_alpha0(mine)
        rows.append(
            Row(
                METHODS[key],
                loss_at,
                metric_at,
                evals=statistics.fmean(r["evals"] for r in mine),
                steps=statistics.fmean(r["steps"] for r in mine),
                seconds=statistics.fmean(r["seconds"] for r in mine),
            )
        )
    return sorted(rows, key=lambda row: (row.worst, row.mean))


def _loss(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "div."


def _metric(task: Task, value: float, spec: str = ".3f") -> str:
    """An accuracy in percent, or a loss-like metric in the format ``spec``."""
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}%" if task.higher_is_better else f"{value:{spec}}"


def table(task: Task, runs: list[dict[str, Any]], rates: list[float], seeds: int, budget: float) -> str:
    """The markdown table of one task, with the best tuned plain optimizer and the targets."""
    rows = summarize(runs)
    lines = [
        f"### {task.title}: final training loss, {budget:g} gradient evaluations per run, {seeds} seed(s)",
        "",
        "Ranked by the worst-α0 final training loss at an equal budget of gradient evaluations "
        "(seconds are measured, not equalised). Each α0 column: mean over seeds. "
        f"Test metric: {task.metric}.",
        "",
        "| method | "
        + " | ".join(f"α0={a:g}" for a in rates)
        + f" | mean ± std over α0 | worst α0 loss | {task.metric} at worst α0 | worst / best tuned plain "
        "| grad evals | steps | seconds |",
        "|---|" + "---:|" * (len(rates) + 7),
    ]
    plain = [row for row in rows if row.method.family == "plain"]
    best_plain = min(plain, key=lambda row: min(row.losses)) if plain else None
    best_loss = min(best_plain.losses) if best_plain else math.nan
    for row in rows:
        if row.method.takes_alpha0:
            cells = [_loss(row.loss_at.get(a, math.nan)) for a in rates]
        else:
            cells = ["—"] * len(rates)
        ratio = row.worst / best_loss if best_plain and math.isfinite(row.worst) else math.inf
        spread = f"{_loss(row.mean)} ± {row.std:.2g}" if math.isfinite(row.mean) else "div."
        lines.append(
            f"| {row.method.label} | "
            + " | ".join(cells)
            + f" | {spread} | {_loss(row.worst)} | {_metric(task, row.metric_at[row.worst_alpha0])} "
            f"| {ratio:.3g}× | {row.evals:.0f} | {row.steps:.0f} | {row.seconds:.1f} |"
        )
    lines.append("")
    if best_plain is not None:
        best_alpha0 = min(best_plain.loss_at, key=lambda a: best_plain.loss_at[a])
        lines.append(
            f"Best tuned plain optimizer: {best_plain.method.label} at α0={best_alpha0:g}: loss "
            f"{_loss(best_loss)}, {task.metric} {_metric(task, best_plain.metric_at[best_alpha0])}."
        )
    lines += _targets(task, rows, best_plain)
    return "\n".join(lines)


def _targets(task: Task, rows: list[Row], best_plain: Row | None) -> list[str]:
    """Where the default Newt stands against its targets (reported, never asserted)."""
    newt = next((row for row in rows if row.method.key == DEFAULT_NEWT), None)
    if newt is None:
        return []
    lines = [f"Targets for the default {newt.method.label}:"]
    free = [row for row in rows if row.method.lr_free]
    if free:
        best_free = min(free, key=lambda row: row.worst)
        verdict = "met" if newt.worst <= best_free.worst else "not met"
        lines.append(
            f"- worst-α0 loss {_loss(newt.worst)} vs the best learning-rate-free peer "
            f"({best_free.method.label}) {_loss(best_free.worst)}: {verdict}."
        )
    if best_plain is not None:
        best_alpha0 = min(best_plain.loss_at, key=lambda a: best_plain.loss_at[a])
        ours, theirs = newt.metric_at[newt.worst_alpha0], best_plain.metric_at[best_alpha0]
        if task.higher_is_better:
            gap = 100 * (theirs - ours)
            verdict = "met" if gap <= 1.0 else "not met"
            where = f"{gap:.1f} points behind" if gap > 0 else f"{-gap:.1f} points ahead"
            lines.append(
                f"- worst-α0 {task.metric} {_metric(task, ours)} vs the best tuned plain optimizer's "
                f"{_metric(task, theirs)}: {where}, {verdict} (target: within 1 point)."
            )
        else:
            lines.append(
                f"- worst-α0 {task.metric} {_metric(task, ours)} vs the best tuned plain optimizer's "
                f"{_metric(task, theirs)} ({ours - theirs:+.3f})."
            )
    peers = [row for row in rows if row.method.family == "peer"]
    if peers:
        beaten = [row for row in peers if newt.mean < row.mean]
        verdict = "met" if len(beaten) == len(peers) else "not met"
        lines.append(
            f"- mean across α0 {_loss(newt.mean)} ± {newt.std:.2g} lower than every peer's: {verdict} "
            f"({len(beaten)} of {len(peers)} peers)."
        )
    return lines


# ---------------------------------------------------------------------------- plots


# Okabe and Ito's palette, told apart with every common colour-vision deficiency.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442"]
PEER_STYLES = [("#000000", "--"), ("#777777", "-."), ("#000000", (0, (6, 2, 1, 2, 1, 2))), ("#777777", "--")]
CLIP = 3.0
"""The loss axis ends at this many times the median first loss: a diverging run would squash the rest."""


def plot(task: Task, runs: list[dict[str, Any]], path: Path) -> None:
    """Draw the figure of :func:`figure` into ``path`` (a PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(task, runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def figure(task: Task, runs: list[dict[str, Any]]) -> Any:
    """Loss curves (against gradient evaluations) and the rates of the default Newt per α0.

    One seed (the smallest). Colours stand for α0 (Adam dotted, Newt solid); the peers, which
    take no α0, are black and grey. The loss axis is clipped at ``CLIP`` times the median first
    loss; a run that leaves it (or turns NaN) is drawn to the edge and marked with a triangle.
    Peers' curves are the mini-batch losses at their training iterate (DoG's averaged model and
    Schedule-Free's x point are only evaluated at the end).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(r["seed"] for r in runs)
    runs = [r for r in runs if r["seed"] == seed]
    alpha0s = sorted({r["alpha0"] for r in runs if r["alpha0"] is not None})
    colors = dict(zip(alpha0s, OKABE_ITO * 2))
    firsts = [v for r in runs for v in _nan(r["curve"]["loss"])[:1] if math.isfinite(v)]
    top = CLIP * statistics.median(firsts) if firsts else math.inf
    peers = iter(PEER_STYLES * 2)
    with plt.rc_context({"font.size": 10, "legend.fontsize": 9, "axes.titlesize": 10}):
        fig, (ax_loss, ax_rate) = plt.subplots(1, 2, figsize=(12, 5.2))
        for r in runs:
            curve, key = r["curve"], r["method"]
            evals, loss, rate = curve["evals"], _nan(curve["loss"]), _nan(curve["rate"])
            if key == "adam":
                style = {"color": colors[r["alpha0"]], "ls": ":", "lw": 1.8, "label": f"Adam α0={r['alpha0']:g}"}
            elif key == DEFAULT_NEWT:
                style = {"color": colors[r["alpha0"]], "ls": "-", "lw": 1.6, "label": f"Newt α0={r['alpha0']:g}"}
                ax_rate.plot(evals, rate, **style)
            elif METHODS[key].lr_free:
                color, ls = next(peers)
                style = {"color": color, "ls": ls, "lw": 1.4, "label": METHODS[key].label}
                ax_rate.plot(evals, rate, **style)
            else:
                continue
            left = _left_the_chart(loss, top)
            if left is not None:
                style["label"] += " (off the chart)"
                ax_loss.plot([evals[left]], [top], marker="^", ms=9, color=style["color"], clip_on=False)
            ax_loss.plot(evals, [min(v, top) if math.isfinite(v) else math.nan for v in loss], **style)
        ax_loss.set(yscale="log", xlabel="gradient evaluations", ylabel="mini-batch loss (window mean)")
        if math.isfinite(top):
            ax_loss.set_ylim(top=top * 1.05)
        ax_loss.set_title(f"{task.title}, seed {seed}: Adam dotted, Newt solid, peers black and grey")
        ax_rate.set(yscale="log", xlabel="gradient evaluations", ylabel="learning rate (peers: effective step size)")
        ax_rate.set_title(f"{METHODS[DEFAULT_NEWT].label} and the peers: the rate from each α0")
        for ax in (ax_loss, ax_rate):
            ax.grid(True, which="major", alpha=0.3)
        handles, labels = ax_loss.get_legend_handles_labels()
        rows = math.ceil(len(labels) / 4)
        fig.legend(handles, labels, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 0.0), frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.045 * rows, 1, 1))
    return fig


def _left_the_chart(loss: list[float], top: float) -> int | None:
    """The first index where a curve rises above ``top`` or turns NaN, or None."""
    for i, value in enumerate(loss):
        if not math.isfinite(value) or value > top:
            return i
    return None


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


# ---------------------------------------------------------------------------- main


FIGURE_PACKAGES = (
    "torch",
    "numpy",
    "scikit-learn",
    "mnist1d",
    "prodigyopt",
    "dog-optimizer",
    "dadaptation",
    "schedulefree",
    "gen-optim",
    "scipy",
)
"""The packages whose versions move the figures (the data, the kernels, the peers)."""


def versions() -> dict[str, str]:
    """Python's and :data:`FIGURE_PACKAGES`' versions, printed with every table."""
    import importlib.metadata
    import platform

    found = {"python": platform.python_version(), "machine": platform.machine()}
    for name in FIGURE_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def select_methods(patterns: list[str]) -> list[str]:
    """Method keys matching any of the shell-style ``patterns`` (e.g. ``newt-adam-*``).

    Ablations (other values of a default option) match only a pattern that names them
    explicitly (one containing their tag, such as ``-nc``: see :data:`ABLATIONS`), so ``*`` is the
    main comparison.
    """

    def selects(pattern: str, key: str) -> bool:
        tag = METHODS[key].ablation
        return fnmatch.fnmatchcase(key, pattern) and (tag is None or tag in pattern)

    keys = [key for key in METHODS if any(selects(p, key) for p in patterns)]
    if not keys:
        raise SystemExit(f"no method matches {patterns}; the methods are: {', '.join(METHODS)}")
    return keys


def jobs_for(task: Task, methods: list[str], rates: list[float], seeds: int, budget: float) -> list[Job]:
    jobs = []
    for seed in range(seeds):
        for key in methods:
            for alpha0 in rates if METHODS[key].takes_alpha0 else [None]:
                jobs.append(Job(task.name, key, alpha0, seed, budget))
    return jobs


def arguments() -> argparse.ArgumentParser:
    """The command line of the sweep."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small budgets, 1 seed, 3 rates, 4 methods (minutes)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None)
    parser.add_argument("--methods", nargs="+", default=None, help=f"keys or patterns, from: {', '.join(METHODS)}")
    parser.add_argument("--rates", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick: 1)")
    parser.add_argument("--budget", type=float, default=None, help="gradient evaluations per run (default: per task)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (one thread each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--plots",
        type=Path,
        default=Path("benchmarks/results"),
        help="where the plots go (docs/img regenerates the documentation's figures)",
    )
    parser.add_argument("--replot", action="store_true", help="rebuild tables and plots from the results in --out")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    torch.set_num_threads(1)
    prefix = "robustness-quick" if args.quick else "robustness"
    if args.replot:
        for name in args.tasks or TASKS:
            saved = json.loads((args.out / f"{prefix}-{name}.json").read_text())
            text = table(TASKS[name], saved["runs"], saved["rates"], saved["seeds"], saved["budget"])
            print("\n" + text)
            (args.out / f"{prefix}-{name}.md").write_text(text + "\n")
            plot(TASKS[name], saved["runs"], args.plots / f"{prefix}-{name}.png")
        return

    tasks = [TASKS[name] for name in (args.tasks or TASKS)]
    methods = select_methods(args.methods or (list(QUICK_METHODS) if args.quick else ["*"]))
    rates = args.rates or list(QUICK_RATES if args.quick else RATES)
    seeds = args.seeds or (1 if args.quick else 3)
    budgets = {t.name: args.budget or (t.quick_budget if args.quick else t.budget) for t in tasks}
    jobs = [job for t in tasks for job in jobs_for(t, methods, rates, seeds, budgets[t.name])]

    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tasks}
    with tqdm(total=len(jobs), desc="robustness sweep", unit="run") as bar:
        if args.jobs <= 1:
            for job in jobs:
                bar.set_postfix_str(f"{job.task} {job.method} α0={job.alpha0}", refresh=False)
                results[job.task].append(run(job))
                bar.update()
        else:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
                futures = [pool.submit(run, job) for job in jobs]
                for future in as_completed(futures):
                    result = future.result()
                    results[result["task"]].append(result)
                    bar.update()
    elapsed = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    order = {job: i for i, job in enumerate(jobs)}
    for t in tasks:
        runs = sorted(
            results[t.name], key=lambda r: order[Job(r["task"], r["method"], r["alpha0"], r["seed"], r["budget"])]
        )
        text = table(t, runs, rates, seeds, budgets[t.name])
        print("\n" + text)
        meta = {
            "task": t.name,
            "title": t.title,
            "budget": budgets[t.name],
            "rates": rates,
            "seeds": seeds,
            "methods": {k: METHODS[k].label for k in methods},
            "torch": torch.__version__,
            "versions": versions(),
            "corpus": corpus_fingerprint() if t.name == "charlm" else None,
        }
        (args.out / f"{prefix}-{t.name}.json").write_text(json.dumps({**meta, "runs": runs}))
        (args.out / f"{prefix}-{t.name}.md").write_text(text + "\n")
        plot(t, runs, args.plots / f"{prefix}-{t.name}.png")
    print("\nVersions: " + ", ".join(f"{name} {version}" for name, version in versions().items()))
    print(f"{len(jobs)} runs in {elapsed:.0f} s. Results in {args.out}/, plots in {args.plots}/{prefix}-*.png")


if __name__ == "__main__":
    main()

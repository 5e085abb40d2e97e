"""The generalisation suite: sixteen small tasks nobody tuned for, split once into two halves.

The robustness sweep (``benchmarks/robustness.py``) measures ``Newt`` on the three tasks its
defaults were chosen on. This suite varies what those three do not: the loss (cross-entropy,
mean squared error, a piecewise-linear hinge, a large constant offset), the batch (8 to the
whole training set), the model (linear, MLP, a CNN with BatchNorm and dropout, a GRU, a small
transformer), the inner optimizer (Adam, AdamW with weight decay), the length (a run of more
than 5,000 steps), a task that reaches zero training loss and a fine-tuning start. All data
ships offline (scikit-learn's bundled sets and generators, the MNIST-1D generator, the
standard library's own documentation text).

The split into a development half and a held-out half is fixed here, before any tuning
(:data:`HALVES`): a default is chosen on the development half only, and the held-out half is
reported separately, as the test of that choice. ::

    python -m benchmarks.suite                        # the development half, 2 seeds
    python -m benchmarks.suite --half held-out        # the held-out half: only to test a choice
    python -m benchmarks.suite --tasks wine --seeds 1 # one task

Per task and method, from the initial rates 1e-5 ... 1: the final training loss (the whole
training set, eval mode), the test metric, how many runs end above their initial loss, the
share of steps spent at a rate bound, and the time per step relative to plain Adam's in the
same run. The methods: the plain inner optimizer, ``Newt`` with a closure and closure-free given
the loss (the defaults), the learning-rate-free peers Prodigy, D-Adaptation and DoG, all at an
equal budget of gradient evaluations, and ``Newt`` with a closure given twice the budget, so
that it takes as many steps as the others (the equal-steps account).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.peers import DAdaptAdamStepper, DoGStepper, ProdigyStepper, Stepper
from benchmarks.robustness import (
    RATES,
    Job,
    Method,
    NewtStepper,
    OverStarts,
    _init_worker,
    _loss,
    _metric,
    per_alpha0,
    run_on,
    versions,
)
from benchmarks.tasks import CharTransformer, Dataset, Task, digits, loss_fn, mnist1d_cached
from newt import Newt

# ---------------------------------------------------------------------------- data


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test])


def _standardized(data: Dataset, targets: bool = False) -> Dataset:
    """Features (and regression targets) scaled by the training set's mean and deviation."""
    mean, std = data.x_train.mean(0), data.x_train.std(0).clamp_min(1e-8)
    x_train, x_test = (data.x_train - mean) / std, (data.x_test - mean) / std
    y_train, y_test = data.y_train, data.y_test
    if targets:
        y_mean, y_std = y_train.mean(0), y_train.std(0)
        y_train, y_test = (y_train - y_mean) / y_std, (y_test - y_mean) / y_std
    return Dataset(x_train, y_train, x_test, y_test)


def _sklearn(load: Callable[..., Any], *, regression: bool = False, **kwargs: Any) -> Dataset:
    features, labels = load(**kwargs)[:2] if kwargs else load(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32).reshape(-1, 1) if regression else torch.tensor(labels).long()
    return _standardized(_split(x, y), targets=regression)


@functools.cache
def wine() -> Dataset:
    from sklearn.datasets import load_wine

    return _sklearn(load_wine)


@functools.cache
def breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    return _sklearn(load_breast_cancer)


@functools.cache
def iris() -> Dataset:
    from sklearn.datasets import load_iris

    return _sklearn(load_iris)


@functools.cache
def diabetes() -> Dataset:
    from sklearn.datasets import load_diabetes

    return _sklearn(load_diabetes, regression=True)


@functools.cache
def friedman() -> Dataset:
    from sklearn.datasets import make_friedman1

    return _sklearn(make_friedman1, regression=True, n_samples=2000, noise=1.0, random_state=0)


@functools.cache
def noisy_logistic() -> Dataset:
    """50 features, 10 informative, a fifth of the labels flipped: every batch of 64 is separable."""
    from sklearn.datasets import make_classification

    return _sklearn(make_classification, n_samples=4000, n_features=50, n_informative=10, flip_y=0.2, random_state=0)


@functools.cache
def moons() -> Dataset:
    from sklearn.datasets import make_moons

    return _sklearn(make_moons, n_samples=1000, noise=0.2, random_state=0)


@functools.cache
def blobs() -> Dataset:
    """Four well-separated clusters: a small MLP reaches zero training loss (float32)."""
    from sklearn.datasets import make_blobs

    return _sklearn(make_blobs, n_samples=600, centers=4, cluster_std=0.4, random_state=0)


@functools.cache
def digits_images() -> Dataset:
    x_train, y_train, x_test, y_test = digits()
    return Dataset(x_train.view(-1, 1, 8, 8), y_train, x_test.view(-1, 1, 8, 8), y_test)


@functools.cache
def digits_flat() -> Dataset:
    return Dataset(*digits())


@functools.cache
def digits_high() -> Dataset:
    """Digits 5 to 9 only: the fine-tuning task after a start trained on 0 to 4."""
    x_train, y_train, x_test, y_test = digits()
    train, test = y_train >= 5, y_test >= 5
    return Dataset(x_train[train], y_train[train], x_test[test], y_test[test])


@functools.cache
def mnist1d_sequences() -> Dataset:
    """MNIST-1D as sequences of 40 scalars, for a recurrent net."""
    x_train, y_train, x_test, y_test = mnist1d_cached()
    return Dataset(x_train.transpose(1, 2).contiguous(), y_train, x_test.transpose(1, 2).contiguous(), y_test)


PROSE_CONTEXT = 32


@functools.cache
def prose() -> Dataset:
    """English prose shipped with Python (``pydoc_data.topics``), byte-level; the tail is the test set."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).encode("ascii", "replace")
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = int(len(tokens) * 0.9)

    def windows(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(part) - 1) // PROSE_CONTEXT
        return part[: n * PROSE_CONTEXT].view(n, -1), part[1 : n * PROSE_CONTEXT + 1].view(n, -1)

    train_x, train_y = windows(tokens[:split])
    test_x, test_y = windows(tokens[split:])
    # The full-training-set loss over 13k windows is slow for a benchmark: a fixed tenth of them.
    keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: len(train_x) // 10]
    return Dataset(train_x[keep], train_y[keep], test_x, test_y, stream=tokens[:split])


def prose_fingerprint() -> str:
    """The size and SHA-256 prefix of the prose text (it changes with the Python release)."""
    import hashlib
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).encode("ascii", "replace")
    return f"{len(text)} bytes, sha256 {hashlib.sha256(text).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- models


def _seeded(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build()

    return model


def _mlp(*widths: int) -> Callable[[int], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    return _seeded(build)


def _cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32 * 16, 10),
    )


class GRUClassifier(nn.Module):
    """A one-layer GRU over the sequence; the last hidden state classifies."""

    def __init__(self, inputs: int = 1, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


def _prose_transformer() -> nn.Module:
    return CharTransformer(context=PROSE_CONTEXT, d_model=32, layers=1, heads=2)


def _finetune_start(seed: int) -> nn.Module:
    """The digits MLP after 300 Adam steps (lr 1e-3) on digits 0 to 4: the start of a fine-tuning run."""
    model = _mlp(64, 64, 10)(seed)
    x_train, y_train, _, _ = digits()
    low = y_train < 5
    x, y = x_train[low], y_train[low]
    generator = torch.Generator().manual_seed(20_000 + seed)
    pretrain = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        pretrain.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        pretrain.step()
    return model


# ---------------------------------------------------------------------------- losses


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def hinge(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The multi-class hinge loss (Crammer-Singer's margin, as ``multi_margin_loss``): piecewise linear."""
    return nn.functional.multi_margin_loss(output, target)


OFFSET = 100.0


def offset_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus a constant: the same minimiser, the same gradients, other loss values."""
    return loss_fn(output, target) + OFFSET


# ---------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class SuiteTask:
    """A task of the suite: the task, its half, the inner optimizer it is run with, what it varies.

    ``offset``: a constant in the task's loss, taken off the losses the table shows (only there).
    """

    task: Task
    half: str
    inner: str
    varies: str
    offset: float = 0.0


def _task(name, title, load, model, batch, budget, metric, loss=loss_fn) -> Task:
    return Task(name, title, load, model, batch, budget, budget, metric, loss)


SUITE: dict[str, SuiteTask] = {
    entry.task.name: entry
    for entry in (
        # --- the development half
        SuiteTask(
            _task("wine", "Wine, MLP", wine, _mlp(13, 32, 3), 16, 300, "accuracy"),
            "development",
            "adam",
            "a tiny tabular set (133 training rows)",
        ),
        SuiteTask(
            _task(
                "noisy-logistic", "Noisy logistic regression, 50-d", noisy_logistic, _mlp(50, 2), 64, 800, "accuracy"
            ),
            "development",
            "adam",
            "a linear model whose batches are separable though the data are not",
        ),
        SuiteTask(
            _task("friedman", "Friedman #1 regression, MLP", friedman, _mlp(10, 64, 1), 16, 800, "test loss", mse),
            "development",
            "adam",
            "mean squared error on a noisy target",
        ),
        SuiteTask(
            _task("digits-cnn", "Digits CNN, BatchNorm, dropout", digits_images, _seeded(_cnn_bn), 64, 600, "accuracy"),
            "development",
            "adam",
            "a CNN with BatchNorm and dropout",
        ),
        SuiteTask(
            _task("mnist1d-gru", "MNIST-1D, GRU", mnist1d_sequences, _seeded(GRUClassifier), 64, 600, "accuracy"),
            "development",
            "adam",
            "a recurrent net",
        ),
        SuiteTask(
            _task("iris-full", "Iris, MLP, full batch", iris, _mlp(4, 16, 3), 10_000, 200, "accuracy"),
            "development",
            "adam",
            "the whole training set in every batch",
        ),
        SuiteTask(
            _task(
                "digits-offset",
                "Digits MLP, loss + 100",
                digits_flat,
                _mlp(64, 64, 10),
                128,
                600,
                "accuracy",
                offset_cross_entropy,
            ),
            "development",
            "adam",
            "a large constant added to the loss",
            offset=OFFSET,
        ),
        SuiteTask(
            _task(
                "cancer-long",
                "Breast cancer, MLP, 10,000 evaluations",
                breast_cancer,
                _mlp(30, 16, 2),
                32,
                10_000,
                "accuracy",
            ),
            "development",
            "adam",
            "a long run (5,000 to 10,000 steps)",
        ),
        # --- the held-out half
        SuiteTask(
            _task("cancer-linear", "Breast cancer, linear", breast_cancer, _mlp(30, 2), 32, 600, "accuracy"),
            "held-out",
            "adam",
            "a linear model on a small tabular set",
        ),
        SuiteTask(
            _task("diabetes", "Diabetes regression, MLP", diabetes, _mlp(10, 32, 1), 32, 800, "test loss", mse),
            "held-out",
            "adam",
            "mean squared error on a small noisy set",
        ),
        SuiteTask(
            _task("digits-hinge", "Digits, linear, hinge loss", digits_flat, _mlp(64, 10), 64, 600, "accuracy", hinge),
            "held-out",
            "adam",
            "a piecewise-linear loss",
        ),
        SuiteTask(
            _task(
                "prose-lm",
                "Byte-level transformer on Python's prose docs",
                prose,
                _seeded(_prose_transformer),
                16,
                400,
                "test bits/byte",
            ),
            "held-out",
            "adam",
            "a language model on English prose",
        ),
        SuiteTask(
            _task("moons-batch8", "Two moons, MLP, batch 8", moons, _mlp(2, 32, 32, 2), 8, 1000, "accuracy"),
            "held-out",
            "adam",
            "batches of 8",
        ),
        SuiteTask(
            _task("blobs-zero", "Separable blobs, MLP", blobs, _mlp(2, 32, 4), 32, 800, "accuracy"),
            "held-out",
            "adam",
            "a task that reaches zero training loss",
        ),
        SuiteTask(
            _task(
                "digits-finetune",
                "Digits 5-9 from a start trained on 0-4",
                digits_high,
                _finetune_start,
                64,
                600,
                "accuracy",
            ),
            "held-out",
            "adam",
            "a fine-tuning start",
        ),
        SuiteTask(
            _task(
                "digits-adamw",
                "Digits MLP, AdamW (weight decay 0.1)",
                digits_flat,
                _mlp(64, 64, 10),
                128,
                600,
                "accuracy",
            ),
            "held-out",
            "adamw",
            "AdamW with weight decay",
        ),
    )
}
"""Every task, with its half. Fixed before any default was chosen on it: do not move a task."""

HALVES = ("development", "held-out")

INNER: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.1),
}

PEERS = ("prodigy", "dadapt-adam", "dog")
NEWT_METHODS = ("newt", "newt-free-loss")
"""The defaults the targets are about."""
VARIANTS = ("newt-gradient", "newt-gradient-steps", "newt-three-point", "newt-exact")
"""Other measurements, reported against the targets too when they were run (``--methods``)."""


def methods(inner: str) -> dict[str, tuple[Method, float]]:
    """The rows of a task run with ``inner``: each method and the factor on the task's budget."""
    make = INNER[inner]
    label = {"adam": "Adam", "adamw": "AdamW"}[inner]

    def newt(closure_free: bool, **options: Any) -> Callable[[nn.Module, float, Any], Stepper]:
        def build(model: nn.Module, lr: float, context: Any) -> Stepper:
            return NewtStepper(Newt(make(model.parameters(), lr), **options), closure_free, give_loss=closure_free)

        return build

    rows = {
        "plain": (Method("plain", label, "plain", True, lambda m, lr, c: Stepper(make(m.parameters(), lr))), 1.0),
        "newt": (Method("newt", f"Newt({label}), closure", "newt", True, newt(False)), 1.0),
        "newt-free-loss": (
            Method("newt-free-loss", f"Newt({label}), closure-free, loss=", "newt", True, newt(True)),
            1.0,
        ),
        # the measurements that read no gradient at the lookahead point, and exact GeN
        # gen with the lookahead's gradient measured (forward_only=False)
        "newt-gradient": (
            Method(
                "newt-gradient",
                f"Newt({label}), closure, gradient at the lookahead",
                "newt",
                True,
                newt(False, forward_only=False),
            ),
            1.0,
        ),
        # as many steps as the default (3/4 of the budget): the two lookaheads at equal steps
        "newt-gradient-steps": (
            Method(
                "newt-gradient-steps",
                f"Newt({label}), closure, gradient at the lookahead, the default's steps",
                "newt",
                True,
                newt(False, forward_only=False),
            ),
            1.5,
        ),
        # as many steps as the plain optimizer and the peers: a step with a forward-only
        # lookahead costs 4/3 gradient evaluations
        "newt-steps": (
            Method("newt-steps", f"Newt({label}), closure, equal steps", "newt", True, newt(False)),
            4.0 / 3.0,
        ),
        "newt-three-point": (
            Method(
                "newt-three-point",
                f"Newt({label}) gen-three-point",
                "newt",
                True,
                newt(False, strategy="gen-three-point"),
            ),
            1.0,
        ),
        "newt-exact": (
            Method("newt-exact", f"Newt({label}) gen-exact", "newt", True, newt(False, strategy="gen-exact")),
            1.0,
        ),
        "prodigy": (Method("prodigy", "Prodigy", "peer", False, lambda m, lr, c: ProdigyStepper(m.parameters())), 1.0),
        "dadapt-adam": (
            Method("dadapt-adam", "D-Adapt Adam", "peer", False, lambda m, lr, c: DAdaptAdamStepper(m.parameters())),
            1.0,
        ),
        "dog": (Method("dog", "DoG (averaged)", "peer", False, lambda m, lr, c: DoGStepper(m)), 1.0),
    }
    return rows


def run_suite_job(job: Job) -> dict[str, Any]:
    """One run of the suite (a module-level function, so that worker processes can run it)."""
    entry = SUITE[job.task]
    method, _ = methods(entry.inner)[job.method]
    return run_on(entry.task, method, job)


def jobs_for(name: str, rates: list[float], seeds: int, keys: list[str] | None = None) -> list[Job]:
    """The runs of one task: ``keys`` (default: every row but the variants), each α0, each seed."""
    entry = SUITE[name]
    jobs = []
    for seed in range(seeds):
        for key, (method, factor) in methods(entry.inner).items():
            if (key not in keys) if keys is not None else key in VARIANTS:
                continue
            for alpha0 in rates if method.takes_alpha0 else [None]:
                jobs.append(Job(name, key, alpha0, seed, entry.task.budget * factor))
    return jobs


# ---------------------------------------------------------------------------- the account


@dataclass
class Summary(OverStarts):
    """One method on one task: the figures the targets read."""

    label: str
    loss_at: dict[float | None, float]  # α0 -> mean final training loss over seeds (inf: diverged)
    metric_at: dict[float | None, float]
    above_initial: int  # runs that end above their own initial training loss (or diverge)
    runs: int
    bound_share: float  # the largest share of a run's steps spent at a rate bound
    seconds_per_step: float
    evals: float
    steps: float


def summarize(entry: SuiteTask, runs: list[dict[str, Any]]) -> dict[str, Summary]:
    rows = methods(entry.inner)
    out = {}
    for key in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == key]
        loss_at, metric_at = per_alpha0(mine)
        out[key] = Summary(
            rows[key][0].label,
            loss_at,
            metric_at,
            above_initial=sum(1 for r in mine if r["diverged"] or r["train_loss"] > r["initial_loss"]),
            runs=len(mine),
            bound_share=max(r["steps_at_bound"] / max(1, r["steps"]) for r in mine),
            seconds_per_step=statistics.fmean(r["seconds"] / max(1, r["steps"]) for r in mine),
            evals=statistics.fmean(r["evals"] for r in mine),
            steps=statistics.fmean(r["steps"] for r in mine),
        )
    return out


def table(entry: SuiteTask, runs: list[dict[str, Any]], rates: list[float], seeds: int) -> str:
    """The markdown table of one task."""
    task = entry.task
    rows = summarize(entry, runs)
    plain_seconds = rows["plain"].seconds_per_step if "plain" in rows else math.nan
    lines = [
        f"### {task.title} ({entry.half}; varies: {entry.varies})",
        "",
        f"{task.budget:g} gradient evaluations per run ('equal steps': 4/3 of that, as many steps as "
        f"the plain optimizer's), {seeds} seed(s); "
        f"final training loss, mean over seeds; test metric: {task.metric}.",
        "",
        "| method | "
        + " | ".join(f"α0={a:g}" for a in rates)
        + " | mean over α0 | worst α0 | metric at worst | runs above initial loss | max share at a rate bound "
        "| steps | time per step / plain |",
        "|---|" + "---:|" * (len(rates) + 7),
    ]
    if entry.offset:
        lines[2] += f" Losses are shown less the loss's constant {entry.offset:g}."

    def shown(value: float) -> str:
        return _loss(value - entry.offset)

    for summary in sorted(rows.values(), key=lambda s: (s.worst, s.mean)):
        cells = [
            "—" if None in summary.loss_at else shown(summary.loss_at[a]) if a in summary.loss_at else "not run"
            for a in rates
        ]
        lines.append(
            f"| {summary.label} | "
            + " | ".join(cells)
            + f" | {shown(summary.mean)} | {shown(summary.worst)} "
            f"| {_metric(task, summary.metric_at[summary.worst_alpha0], '.3g')} "
            f"| {summary.above_initial} of {summary.runs} | {100 * summary.bound_share:.0f}% | {summary.steps:.0f} "
            f"| {summary.seconds_per_step / plain_seconds:.2f} |"
        )
    return "\n".join(lines)


def targets(results: dict[str, list[dict[str, Any]]]) -> str:
    """Where the defaults stand on the tasks run, against the targets (reported, never asserted)."""
    lines = ["### Targets, at an equal budget of gradient evaluations", ""]
    lines.append(
        "| method | worst α0 ≤ best peer's | mean over α0 < every peer's | no run above its initial loss "
        "| at most 5 % of steps at a bound | metric at worst within 1 point / 5 % of tuned plain |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|")
    n = len(results)
    run = {r["method"] for runs in results.values() for r in runs}
    for key in (k for k in (*NEWT_METHODS, *VARIANTS) if k in run):
        counts = [0, 0, 0, 0, 0]
        for name, runs in results.items():
            entry = SUITE[name]
            rows = summarize(entry, runs)
            if key not in rows:
                continue
            mine, peers = rows[key], [rows[p] for p in PEERS if p in rows]
            counts[0] += bool(peers) and all(mine.worst <= p.worst for p in peers)
            counts[1] += bool(peers) and all(mine.mean < p.mean for p in peers)
            counts[2] += mine.above_initial == 0
            counts[3] += mine.bound_share <= 0.05
            plain = rows.get("plain")
            if plain is not None:
                best_alpha0 = min(plain.loss_at, key=lambda a: plain.loss_at[a])
                ours, theirs = mine.metric_at[mine.worst_alpha0], plain.metric_at[best_alpha0]
                if entry.task.higher_is_better:
                    counts[4] += theirs - ours <= 0.01
                else:
                    counts[4] += ours <= 1.05 * theirs
        label = methods("adam")[key][0].label
        lines.append(f"| {label} | " + " | ".join(f"{c} of {n}" for c in counts) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def arguments() -> argparse.ArgumentParser:
    """The command line of the suite."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--half", choices=HALVES, default="development")
    parser.add_argument("--tasks", nargs="+", choices=sorted(SUITE), default=None, help="instead of a half")
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="the rows to run (default: all but the variants " + ", ".join(VARIANTS) + ")",
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (one thread each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/suite"))
    parser.add_argument("--retable", action="store_true", help="rebuild the tables from the results in --out")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    torch.set_num_threads(1)
    names = args.tasks or [name for name, entry in SUITE.items() if entry.half == args.half]
    if args.retable:
        saved = {name: json.loads((args.out / f"{name}.json").read_text())["runs"] for name in names}
        seeds = len({r["seed"] for runs in saved.values() for r in runs})
        texts = [table(SUITE[name], runs, args.rates, seeds) for name, runs in saved.items()]
        print("\n\n".join([*texts, targets(saved)]))
        return
    jobs = [job for name in names for job in jobs_for(name, args.rates, args.seeds, args.methods)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    started = time.perf_counter()
    if args.jobs <= 1:
        for i, job in enumerate(jobs):
            results[job.task].append(run_suite_job(job))
            print(f"\r{i + 1}/{len(jobs)} runs", end="", flush=True)
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            futures = [pool.submit(run_suite_job, job) for job in jobs]
            for i, future in enumerate(as_completed(futures)):
                result = future.result()
                results[result["task"]].append(result)
                print(f"\r{i + 1}/{len(jobs)} runs", end="", flush=True)
    elapsed = time.perf_counter() - started
    order = {job: i for i, job in enumerate(jobs)}
    args.out.mkdir(parents=True, exist_ok=True)
    texts = []
    for name in names:
        runs = sorted(
            results[name], key=lambda r: order[Job(r["task"], r["method"], r["alpha0"], r["seed"], r["budget"])]
        )
        results[name] = runs
        texts.append(table(SUITE[name], runs, args.rates, args.seeds))
        meta = {"task": name, "half": SUITE[name].half, "versions": versions(), "python_docs": prose_fingerprint()}
        (args.out / f"{name}.json").write_text(json.dumps({**meta, "runs": runs}))
    texts.append(targets(results))
    text = "\n\n".join(texts)
    print("\n\n" + text)
    (args.out / f"suite-{'-'.join(names) if args.tasks else args.half}.md").write_text(text + "\n")
    print(f"\n{len(jobs)} runs in {elapsed:.0f} s. Results in {args.out}/")


if __name__ == "__main__":
    main()

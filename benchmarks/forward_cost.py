"""What a forward pass costs against a forward and backward pass, on every benchmark model.

Run ``python -m benchmarks.forward_cost`` (about a minute on 2 CPU cores). The robustness sweep
and the suite count a forward pass without a backward as a third of a gradient evaluation
(``benchmarks.peers.FORWARD_ONLY_COST``): the cost of ``Newt``'s forward-only lookahead and of
``gen-three-point``'s second point. This measures the ratio on each model of
``benchmarks/tasks.py`` and ``benchmarks/suite.py``, at its batch size: the median over
interleaved repetitions of the closure's forward pass without autograd, against the closure's
forward and backward pass (``zero_grad``, the loss, ``backward()``), one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.peers import FORWARD_ONLY_COST
from benchmarks.robustness import TASKS, batch_generator
from benchmarks.suite import SUITE
from benchmarks.tasks import Task


def _seconds(body: Callable[[], None]) -> float:
    start = time.perf_counter()
    body()
    return time.perf_counter() - start


def ratio(task: Task, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a forward pass, of a forward and backward pass, and their ratio."""
    data = task.load()
    model = task.model(0)
    model.train()
    x, y = data.sample(batch_generator(0), task.batch_size)

    def forward() -> None:
        with torch.no_grad():
            task.loss(model(x), y)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()

    forwards, both = [], []
    for repetition in range(repeats + 2):
        f, fb = _seconds(forward), _seconds(forward_backward)
        if repetition >= 2:  # warm-up: allocators, lazy initialisation
            forwards.append(f)
            both.append(fb)
    f, fb = statistics.median(forwards), statistics.median(both)
    return f, fb, f / fb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = {task.name: task for task in TASKS.values()}
    tasks.update({name: entry.task for name, entry in SUITE.items()})
    print("| task | parameters | batch | forward | forward and backward | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = []
    for name, task in tasks.items():
        forward, both, share = ratio(task, args.repeats)
        ratios.append(share)
        parameters = sum(p.numel() for p in task.model(0).parameters())
        cells = [f"{parameters:,}", str(task.batch_size), f"{forward * 1e3:.3f} ms", f"{both * 1e3:.3f} ms"]
        print(f"| {name} | " + " | ".join(cells) + f" | {share:.2f} |")
    print(
        f"\nmedian ratio {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); "
        f"the benchmarks count {FORWARD_ONLY_COST:.2f}"
    )


if __name__ == "__main__":
    main()

"""The table behind tests/test_inner_optimizers.py: every inner optimizer, from a bad start.

For each inner optimizer the test suite registers (``tests/inner_optimizers.py``) and both of
its bad initial rates, the same MLP is trained on identical batches by the plain optimizer and
by ``Newt(inner, strategy)``, exactly as the test does (``tests.test_inner_optimizers.train``).
Prints the final full-training-set losses and the rate ``Newt`` settled on, as a markdown table.

Run ``python -m benchmarks.inner_optimizers`` for ``taylor``, with ``--strategy auto`` for the
default (under a minute each on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ProcessPoolExecutor

import torch

from tests.inner_optimizers import INNER_OPTIMIZERS
from tests.test_inner_optimizers import SETTLED_WINDOW, TOO_SMALL, train


def _row(index: int, lr: float, strategy: str) -> str:
    torch.set_num_threads(1)  # as in the test: one thread, reproducible sums
    entry = INNER_OPTIMIZERS[index]
    newt = train(entry, lr, adapt=True, strategy=strategy)
    plain = train(entry, lr, adapt=False)
    settled = statistics.median(newt.rates[-SETTLED_WINDOW:])
    return f"| {entry.id} | {lr:g} | {plain.final_loss:.4g} | {newt.final_loss:.4g} | {settled:.3g} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--strategy", default="taylor", help="Newt's strategy (default: taylor, as the test)")
    args = parser.parse_args(argv)
    cases = [(i, lr, args.strategy) for i, entry in enumerate(INNER_OPTIMIZERS) for lr in (TOO_SMALL, entry.too_large)]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_row, *zip(*cases)))
    print("| inner | initial lr | plain | Newt | Newt settled lr |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Gradient clipping inside the closure against Newt's own ``max_grad_norm``, on a digits CNN.

Run ``python -m benchmarks.clipping`` (under a minute on 2 cores). A small CNN on the 8x8
digits, AdamW (lr 1e-3, weight decay 0.01), batch 64, 70 steps, ``Newt`` with its defaults, three
ways: no clipping; ``clip_grad_norm_(model.parameters(), max_norm)`` inside the closure (by
default 0.3, which cuts most calls), which
clips the first and the lookahead call by different factors, so that the slopes the rule
compares belong to two different rescalings of the gradient; and ``max_grad_norm=max_norm``, where
the inner step gets the clipped gradients and the rule the unclipped ones. For each it prints
how often clipping cut, how many steps the rule read as "nonconvex" (curvature not safely
positive: the rate is kept), the final rate and the final loss on the whole training set.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch import nn

from benchmarks.tasks import digits
from newt import Decision, Newt


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def run(way: str, steps: int, seed: int, max_norm: float = 1.0) -> dict:
    x, y, _, _ = digits()
    model = _cnn(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    opt = Newt(inner, max_grad_norm=max_norm if way == "max_grad_norm" else None)
    batches = torch.Generator().manual_seed(seed + 1)
    cut = calls = 0
    decisions: Counter[str] = Counter()
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,), generator=batches)

        def closure(index=index) -> torch.Tensor:
            nonlocal cut, calls
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if way == "in closure" else float("inf"))
            calls += 1
            cut += int(norm > max_norm)
            return loss

        opt.step(closure)
        decisions[str(opt.step_info.decision)] += 1
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(x), y))
    return {"cut": cut / calls, "nonconvex": decisions[Decision.NONCONVEX.value], "rate": opt.alpha, "loss": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-norm", type=float, default=0.3, help="clips 80-90 %% of the calls here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"digits CNN, AdamW lr 1e-3, Newt defaults, {args.steps} steps, max norm {args.max_norm:g}; "
        "per seed: the share of closure calls whose gradient norm is above it, nonconvex steps, rate, loss"
    )
    print("| clipping | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for way in ("none", "in closure", "max_grad_norm"):
        cells = []
        for seed in args.seeds:
            r = run(way, args.steps, seed, args.max_norm)
            cells.append(f"{r['cut']:.0%} cut, {r['nonconvex']} nonconvex, rate {r['rate']:.2g}, loss {r['loss']:.3f}")
        print(f"| {way} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The evidence behind the default options: final training loss on the digits MLP for a few
option sets, inner optimizers and initial rates (one seed; a first look, not the full sweep).

Run ``python -m benchmarks.sweep_defaults`` (several minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse

from benchmarks.demo import train
from newt import Policies

# The rules and their options alone: every policy is off (benchmarks/spike_policy.py measures the
# spike policy, and the robustness sweep the others).
OFF = dict(policies=Policies.off())
CONFIGS = {
    "taylor g=0.5 mf=10": dict(strategy="taylor", gamma=0.5, max_factor=10.0, **OFF),
    "taylor g=0.5 mf=2": dict(strategy="taylor", gamma=0.5, max_factor=2.0, **OFF),
    "taylor g=0.2 mf=2": dict(strategy="taylor", gamma=0.2, max_factor=2.0, **OFF),
    "gen b=0.9 mf=2": dict(strategy="gen", smoothing=0.9, max_factor=2.0, **OFF),
    "retsinas g=0.2 mf=2": dict(strategy="retsinas", gamma=0.2, max_factor=2.0, **OFF),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-5, 1e-3, 1e-1, 1.0])
    args = parser.parse_args()
    print("| options | inner | " + " | ".join(f"lr0={r:g}" for r in args.rates) + " |")
    print("|---|---|" + "---:|" * len(args.rates))
    for name, options in CONFIGS.items():
        for inner in ("adam", "sgd"):
            cells = []
            for rate in args.rates:
                run = train(inner, rate, True, args.steps, args.seed, **options)
                cells.append(f"{run['train_loss']:.4f} (lr {run['rates'][-1]:.0e})")
            print(f"| {name} | {inner} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""The quick demo: train an MLP on scikit-learn's digits from a range of bad and good initial
learning rates, with the plain inner optimizer and with ``Newt`` wrapped around it.

Run ``python -m benchmarks.demo`` (about a minute on 2 CPU cores). It prints a markdown table of
the final training loss and test accuracy per initial rate and writes
``benchmarks/results/demo.png`` (the loss curves and the learning-rate trajectories; ignored by
git); ``--plot docs/img/demo.png`` regenerates the documentation's figure.
"""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from benchmarks.tasks import digits, digits_mlp
from newt import Newt

INNER = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


def train(inner_name: str, lr: float, use_newt: bool, steps: int, seed: int, **newt_options) -> dict:
    """Train the digits MLP; ``newt_options`` go to ``Newt`` (ignored for the plain run)."""
    x_train, y_train, x_test, y_test = digits()
    model = digits_mlp(seed)
    inner = INNER[inner_name](model.parameters(), lr)
    opt = Newt(inner, **newt_options) if use_newt else inner
    batches = torch.Generator().manual_seed(seed)
    losses, rates = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=batches)
        xb, yb = x_train[idx], y_train[idx]

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
        rates.append(opt.param_groups[0]["lr"])
    model.eval()
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(x_train), y_train))
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    rejected = opt.state_dict()["newt"]["rejected"] if use_newt else 0
    return {"losses": losses, "rates": rates, "train_loss": train_loss, "accuracy": accuracy, "rejected": rejected}


def arguments() -> argparse.ArgumentParser:
    """The command line of the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--inner", choices=sorted(INNER), default="adam")
    parser.add_argument("--strategy", default="auto", help="Newt's strategy (default: Newt's own, 'auto')")
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/demo.png"))
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another Newt option, e.g. --option hold_on_ascent=False (a Python literal; repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arguments()
    args = parser.parse_args(argv)
    options = dict(_option(text, parser) for text in args.option)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    runs = {}
    jobs = [(lr, use_newt) for lr in args.rates for use_newt in (False, True)]
    for lr, use_newt in tqdm(jobs, desc=f"digits MLP, {args.inner}", unit="run"):
        runs[lr, use_newt] = train(args.inner, lr, use_newt, args.steps, args.seed, strategy=args.strategy, **options)

    print(
        f"\nDigits MLP, {args.steps} steps of 128, inner {args.inner}, strategy {args.strategy!r}, seed {args.seed}"
        + "".join(f", {name}={value!r}" for name, value in options.items())
    )
    print("| initial lr | plain: train loss | plain: test acc | Newt: train loss | Newt: test acc | Newt: final lr |")
    print("|---:|---:|---:|---:|---:|---:|")
    for lr in args.rates:
        plain, newt = runs[lr, False], runs[lr, True]
        print(
            f"| {lr:g} | {plain['train_loss']:.4f} | {plain['accuracy']:.3f} | {newt['train_loss']:.4f} "
            f"| {newt['accuracy']:.3f} | {newt['rates'][-1]:.3g} |"
        )
    worst = max(runs[lr, True]["train_loss"] for lr in args.rates)
    best_plain = min(runs[lr, False]["train_loss"] for lr in args.rates)
    print(f"\nWorst Newt train loss over the rates: {worst:.4f}; best tuned plain: {best_plain:.4f}")
    plot(runs, args)


def _option(text: str, parser: argparse.ArgumentParser) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    try:
        if not (sep and name.isidentifier()):
            raise ValueError
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parser.error(f"--option takes NAME=VALUE with a Python literal value, e.g. hold_on_ascent=False; got {text!r}")


def plot(runs: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.robustness import OKABE_ITO

    plt.rcParams.update({"font.size": 10, "legend.fontsize": 9, "axes.titlesize": 10})
    fig, (ax_loss, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, lr in zip(OKABE_ITO * 2, args.rates):
        for use_newt, style in ((False, ":"), (True, "-")):
            run = runs[lr, use_newt]
            label = f"{'Newt' if use_newt else 'plain'} lr0={lr:g}"
            ax_loss.plot(_smooth(run["losses"]), style, color=color, label=label, lw=1.6)
        ax_rate.plot(runs[lr, True]["rates"], color=color, label=f"lr0={lr:g}", lw=1.6)
    ax_loss.set(yscale="log", xlabel="step", ylabel="mini-batch loss (smoothed)")
    ax_loss.set_title("plain (dotted) vs Newt (solid)")
    ax_rate.set(yscale="log", xlabel="step", ylabel="learning rate")
    ax_rate.set_title(f"Newt's rate ({args.strategy}, {args.inner})")
    ax_rate.legend()
    for ax in (ax_loss, ax_rate):
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"Wrote {args.plot}")


def _smooth(values: list[float], width: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v if math.isfinite(v) else 1e3
        if i >= width:
            acc -= values[i - width] if math.isfinite(values[i - width]) else 1e3
        out.append(acc / min(i + 1, width))
    return out


if __name__ == "__main__":
    main()

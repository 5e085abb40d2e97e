"""How well each cheap estimate of the curvature along a step matches the exact one.

Every rule reads the curvature of the loss along the inner optimizer's direction ``w`` (the step
per unit of rate) off a few measured numbers. On the line ``g(a) = L(theta - a w)`` around a
state ``theta`` and for a trial rate ``a``, with ``g0 = g(0)``, ``g1 = g(a)``, ``gb = g(-a)``
(the point behind), ``s0 = <grad L(theta), w>`` and ``s1 = <grad L(theta - a w), w>``:

- Retsinas' slope difference: ``(s0 - s1) / a``;
- the Taylor rule's loss-based form: ``2 (g0 - g1 - a s1) / a^2``;
- GeN's two-point fit (``f0``, ``D0``, ``f1``): ``2 (g1 - g0 + a s0) / a^2``;
- the three-point fit of GeN's authors (``f(theta - a w)``, ``f(theta)``, ``f(theta + a w)``):
  ``(gb - 2 g0 + g1) / a^2``.

The exact curvature is ``w^T H w`` at ``theta``, from one Hessian-vector product (double
backward). Each estimate is exact on a quadratic; with a cubic term ``t a^3 / 6`` in ``g`` the
three two-point estimates are off by a term proportional to ``a`` (``t a / 2``, ``2 t a / 3``,
``t a / 3``), while the three-point fit stays exact (its error comes from the fourth derivative,
in proportion to ``a^2``). The study measures whether real losses behave so, and what each error
does to the rate it implies (the minimiser of the local quadratic model, each rule in its own
form: :func:`minimisers`), against the exact ``s0 / (w^T H w)``.

States: a plain Adam run (lr 1e-3, seed 0) on each benchmark task, read early, in the middle and
late; ``w`` is the direction Adam would take there, the batch that step's. Everything in float64,
so that rounding does not hide the approximation error at small ``a``. ::

    python -m benchmarks.curvature                   # the three tasks, about a minute
    python -m benchmarks.curvature --plots docs/img  # the documentation's figures
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.robustness import OKABE_ITO, batch_generator
from benchmarks.tasks import TASKS

ESTIMATES = ("retsinas", "taylor", "gen two-point", "three-point")
ALPHAS = tuple(10.0**e for e in torch.linspace(-5, 0, 21).tolist())
STATES = {"digits": (5, 100, 350), "mnist1d": (5, 200, 750), "charlm": (5, 100, 400)}
"""The Adam steps after which each task's state is read (early, middle, late)."""


@dataclass(frozen=True)
class Line:
    """The loss along one direction from one state: what the estimates and the exact value read."""

    loss: Callable[[float], float]  # g(a) = L(theta - a w) on the state's batch
    slope: Callable[[float], float]  # <grad L(theta - a w), w>
    curvature: float  # w^T H w at theta, exact


def estimates(line: Line, a: float) -> dict[str, float]:
    """Each cheap estimate of the curvature along the line, from a trial rate ``a``."""
    g0, g1, gb = line.loss(0.0), line.loss(a), line.loss(-a)
    s0, s1 = line.slope(0.0), line.slope(a)
    return {
        "retsinas": (s0 - s1) / a,
        "taylor": 2.0 * (g0 - g1 - a * s1) / a**2,
        "gen two-point": 2.0 * (g1 - g0 + a * s0) / a**2,
        "three-point": (gb - 2.0 * g0 + g1) / a**2,
    }


def minimisers(line: Line, a: float) -> dict[str, float]:
    """Each rule's own estimate of the line's minimiser from a trial rate ``a``, undamped.

    Retsinas' and GeN's rules move to ``s0 / curvature``; the Taylor rule takes a Newton step from
    the trial point, ``a + s1 / curvature``; the three-point fit reads the slope off the same
    three losses, ``(gb - g1) / (2 a curvature)``. On a quadratic line each is the minimiser.
    """
    curvature = estimates(line, a)
    s0, s1 = line.slope(0.0), line.slope(a)
    g1, gb = line.loss(a), line.loss(-a)
    return {
        "retsinas": s0 / curvature["retsinas"],
        "taylor": a + s1 / curvature["taylor"],
        "gen two-point": s0 / curvature["gen two-point"],
        "three-point": (gb - g1) / (2.0 * a * curvature["three-point"]),
    }


def hessian_along(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], w: Sequence[torch.Tensor]) -> float:
    """``w^T H w`` at the parameters' current values: one double-backward Hessian-vector product."""
    grads = torch.autograd.grad(loss(), params, create_graph=True)
    along = sum((g * v).sum() for g, v in zip(grads, w))
    hw = torch.autograd.grad(along, params)
    return float(sum((h * v).sum() for h, v in zip(hw, w)))


def line_of(model: nn.Module, loss: Callable[[], torch.Tensor], w: Sequence[torch.Tensor]) -> Line:
    """The line through the model's current parameters along ``-w``, on one batch's ``loss``."""
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]

    def at(a: float) -> None:
        with torch.no_grad():
            for p, t, v in zip(params, theta, w):
                p.copy_(t - a * v)

    def value(a: float) -> float:
        # With autograd on, like the slopes: some layers take another kernel under no_grad
        # (the transformer's inference fast path), whose last bits differ.
        at(a)
        result = float(loss().detach())
        at(0.0)
        return result

    def slope(a: float) -> float:
        at(a)
        grads = torch.autograd.grad(loss(), params)
        at(0.0)
        return float(sum((g * v).sum() for g, v in zip(grads, w)))

    return Line(value, slope, hessian_along(loss, params, w))


def adam_direction(
    model: nn.Module, optimizer: torch.optim.Adam, loss: Callable[[], torch.Tensor]
) -> list[torch.Tensor]:
    """The step per unit of rate that ``optimizer`` would take from here on this batch (not taken)."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad()
    loss().backward()
    optimizer.step()
    w = [(b - p.detach()) / lr for b, p in zip(before, params)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    optimizer.load_state_dict(saved)
    optimizer.zero_grad()
    return w


def smoothed(model: nn.Module) -> nn.Module:
    """The model with every ReLU replaced by GELU: the same network without kinks (a control)."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.GELU())
        elif isinstance(child, nn.TransformerEncoderLayer):
            child.activation = nn.functional.gelu
            child.activation_relu_or_gelu = 2
        else:
            smoothed(child)
    return model


def study(task_name: str, seed: int = 0, lr: float = 1e-3, smooth: bool = False) -> list[dict]:
    """For each state of :data:`STATES`: the exact curvature, and per trial rate each estimate."""
    task = TASKS[task_name]
    data = task.load()
    torch.manual_seed(seed)
    model = task.model(seed).double()
    if smooth:
        model = smoothed(model)
    model.eval()  # no dropout: one deterministic line per state
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = batch_generator(seed)
    results, step = [], 0
    for target in STATES[task_name]:
        while step < target:
            x, y = data.sample(batches, task.batch_size)
            optimizer.zero_grad()
            task.loss(model(_double(x)), y).backward()
            optimizer.step()
            step += 1
        x, y = data.sample(batches, task.batch_size)
        x = _double(x)

        def loss(x=x, y=y) -> torch.Tensor:
            return task.loss(model(x), y)

        w = adam_direction(model, optimizer, loss)
        line = line_of(model, loss, w)
        s0 = line.slope(0.0)
        results.append(
            {
                "task": task_name,
                "step": step,
                "curvature": line.curvature,
                "rate": s0 / line.curvature if line.curvature > 0 else math.nan,
                "slope": s0,
                "alphas": list(ALPHAS),
                "estimates": [estimates(line, a) for a in ALPHAS],
                "minimisers": [minimisers(line, a) for a in ALPHAS],
            }
        )
    return results


def _double(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x


def relative_error(value: float, exact: float) -> float:
    return abs(value - exact) / abs(exact) if exact != 0 else math.inf


def table(results: list[dict]) -> str:
    """Per state and estimate: the relative error of the curvature and of the implied rate at three ``a``."""
    picks = (1e-4, 1e-3, 1e-2)
    lines = [
        "| task | step | exact `wᵀHw` | exact rate | estimate | "
        + " | ".join(f"curvature error, a={a:g}" for a in picks)
        + " | "
        + " | ".join(f"rate error, a={a:g}" for a in picks)
        + " |",
        "|---|---:|---:|---:|---|" + "---:|" * (2 * len(picks)),
    ]
    for r in results:
        indices = [min(range(len(r["alphas"])), key=lambda i: abs(math.log(r["alphas"][i] / a))) for a in picks]
        for name in ESTIMATES:
            curv = [relative_error(r["estimates"][i][name], r["curvature"]) for i in indices]
            rates = [relative_error(r["minimisers"][i][name], r["rate"]) for i in indices]
            lines.append(
                f"| {r['task']} | {r['step']} | {r['curvature']:.3g} | {r['rate']:.3g} | {name} | "
                + " | ".join(f"{e:.2g}" for e in curv)
                + " | "
                + " | ".join(f"{e:.2g}" for e in rates)
                + " |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Relative error of each curvature estimate against the trial rate, one panel per state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    with plt.rc_context({"font.size": 10, "legend.fontsize": 9, "axes.titlesize": 10}):
        fig, axes = plt.subplots(len(tasks), 3, figsize=(12, 3.2 * len(tasks)), squeeze=False)
        for row, task in enumerate(tasks):
            for col, r in enumerate(x for x in results if x["task"] == task):
                ax = axes[row][col]
                for color, name in zip(OKABE_ITO, ESTIMATES):
                    errors = [relative_error(e[name], r["curvature"]) for e in r["estimates"]]
                    ax.loglog(r["alphas"], [max(e, 1e-16) for e in errors], "-o", ms=3, color=color, label=name)
                if r["rate"] > 0:
                    ax.axvline(r["rate"], color="#777777", ls=":", lw=1)
                ax.set_title(f"{task}, after {r['step']} Adam steps")
                ax.set(xlabel="trial rate a", ylabel="relative error of the curvature")
                ax.grid(True, which="major", alpha=0.3)
        axes[0][0].legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)


def arguments() -> argparse.ArgumentParser:
    """The command line of the study."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", choices=sorted(STATES), default=list(STATES))
    parser.add_argument("--plots", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smooth", action="store_true", help="GELU for every ReLU: the control without kinks")
    return parser


def main(argv: list[str] | None = None) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = arguments().parse_args(argv)
    torch.set_num_threads(2)
    # The reference attention kernel: the fused ones have no double backward (the transformer's HVP).
    with sdpa_kernel(SDPBackend.MATH):
        results = [r for task in args.tasks for r in study(task, smooth=args.smooth)]
    print(table(results))
    path = args.plots / f"curvature-estimates{'-smooth' if args.smooth else ''}.png"
    plot(results, path)
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()

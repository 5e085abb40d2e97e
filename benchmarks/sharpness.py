"""The sharpest curvature of the batch loss against the rate, along one run of the sweep.

Run ``python -m benchmarks.sharpness --method newt-sgd-gen --alpha0 1e-3 --seed 1`` (about 15
seconds on one core). It trains one run of the robustness sweep (``benchmarks/robustness.py``:
the same task, model, seed and batches) and, at the steps asked for, measures on that step's
batch at the point the step started from:

- ``lambda_max``: the Hessian's eigenvalue of largest magnitude, by power iteration on
  Hessian-vector products (double backward);
- the curvature along the step actually taken, ``d^T H d / |d|^2``;
- ``rate * lambda_max``. For SGD with momentum ``beta`` (``p -= rate * buf``, ``buf = beta * buf +
  grad``), the iteration on a quadratic is stable along an eigendirection only while
  ``rate * lambda < 2 (1 + beta)``.

`Newt`'s rules see the curvature along the step only. Where the step misses the sharpest
direction, they can raise the rate past that limit there, and the instability grows over several
steps without any one step's loss rising sharply (docs/benchmarks.md, the noise-correction
section). This script is how that was measured.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch

from benchmarks.robustness import METHODS, TASKS, Context, batch_generator
from benchmarks.tasks import loss_fn

Tensors = Sequence[torch.Tensor]


def _dot(a: Tensors, b: Tensors) -> float:
    return math.fsum(float((x * y).sum()) for x, y in zip(a, b))


def gradient_graph(loss: Callable[[], torch.Tensor], params: Tensors) -> tuple[torch.Tensor, ...]:
    """The gradient of ``loss()`` with its graph kept: the Hessian-vector products below reuse it."""
    with torch.enable_grad():
        return torch.autograd.grad(loss(), params, create_graph=True)


def _hvp(gradient: tuple[torch.Tensor, ...], params: Tensors, vector: Tensors) -> list[torch.Tensor]:
    products = torch.autograd.grad(gradient, params, grad_outputs=list(vector), retain_graph=True)
    return [p.detach() for p in products]


def top_eigenvalue(
    gradient: tuple[torch.Tensor, ...], params: Tensors, *, iterations: int = 30, seed: int = 0
) -> float:
    """The Hessian's eigenvalue of largest magnitude, by power iteration on ``gradient``'s graph.

    Returns the Rayleigh quotient of the last iterate: a lower bound on ``|lambda_max|`` that
    converges to it at the rate of the gap to the next eigenvalue.
    """
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    estimate = 0.0
    for _ in range(iterations):
        norm = math.sqrt(_dot(vector, vector))
        vector = [v / norm for v in vector]
        product = _hvp(gradient, params, vector)
        estimate = _dot(vector, product)
        vector = product
    return estimate


def curvature_along(gradient: tuple[torch.Tensor, ...], params: Tensors, direction: Tensors) -> float:
    """``d^T H d / |d|^2`` on ``gradient``'s graph: the curvature along ``direction`` (NaN if it is zero)."""
    norm2 = _dot(direction, direction)
    if norm2 == 0.0:  # no step: Newt undid it (a spike, or a failed start)
        return math.nan
    return _dot(direction, _hvp(gradient, params, direction)) / norm2


def sgd_momentum(optimizer: torch.optim.Optimizer) -> float | None:
    """The momentum of ``optimizer`` if it is SGD or wraps SGD (``Newt``'s ``inner``), else None."""
    inner = getattr(optimizer, "inner", optimizer)
    return inner.param_groups[0]["momentum"] if isinstance(inner, torch.optim.SGD) else None


def trace(
    task: str, method: str, alpha0: float, seed: int, steps: int, probes: set[int]
) -> tuple[list[dict[str, float]], float | None]:
    """Train ``steps`` steps of one sweep run; measure the curvatures at the ``probes`` steps.

    Returns the measurements and the SGD momentum of the method (None if it is not SGD). The
    probes' passes run in training mode, which dropout or BatchNorm would notice; the sweep's
    three models have neither, so a probed run goes on exactly as an unprobed one.
    """
    spec = TASKS[task]
    data = spec.load()
    model = spec.model(seed)
    batches = batch_generator(seed)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return data.sample(batches, spec.batch_size)

    # The full sweep's budget, which some peers build their schedules from (Schedule-Free's warm-up)
    stepper = METHODS[method].build(model, alpha0, Context(budget=spec.budget, batches=iter(draw, None)))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    stepper.train()
    rows = []
    for step in range(steps):
        x, y = draw()
        rate = stepper.rate()  # the rate this step uses
        start = [p.detach().clone() for p in params]
        batch_loss = stepper.step(lambda: loss_fn(model(x), y))
        if step not in probes:
            continue
        end = [p.detach().clone() for p in params]
        with torch.no_grad():  # measure at the start of the step, on its batch
            for p, s in zip(params, start):
                p.copy_(s)
        gradient = gradient_graph(lambda: loss_fn(model(x), y), params)
        sharpest = top_eigenvalue(gradient, params)
        along = curvature_along(gradient, params, [s - e for s, e in zip(start, end)])
        with torch.no_grad():
            for p, e in zip(params, end):
                p.copy_(e)
        rows.append({"step": step, "loss": batch_loss, "rate": rate, "lambda_max": sharpest, "along_step": along})
    return rows, sgd_momentum(stepper.optimizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d", choices=list(TASKS))
    parser.add_argument("--method", default="newt-sgd-gen", choices=sorted(METHODS))
    parser.add_argument("--alpha0", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--every", type=int, default=4, help="measure every this many steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    probes = set(range(1, args.steps, args.every))
    rows, beta = trace(args.task, args.method, args.alpha0, args.seed, args.steps, probes)
    limit = "" if beta is None else f" (SGD with momentum {beta}: stable while below {2 * (1 + beta):.1f})"
    print(f"{args.method} on {args.task} from {args.alpha0:g}, seed {args.seed}{limit}\n")
    print("| step | batch loss | rate | lambda_max | rate * lambda_max | curvature along the step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        along = "undone" if math.isnan(r["along_step"]) else f"{r['along_step']:.3g}"
        print(
            f"| {r['step']} | {r['loss']:.3f} | {r['rate']:.3g} | {r['lambda_max']:.3g} "
            f"| {r['rate'] * r['lambda_max']:.3g} | {along} |"
        )


if __name__ == "__main__":
    main()

"""Small, deterministic data and model helpers shared by the training tests.

The data set is scikit-learn's ``load_digits`` (1797 8x8 images, ten classes): small enough to
train on in a few seconds on a CPU, real enough that a bad learning rate visibly hurts.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "digits", "full_batch_loss", "make_mlp", "minibatch_indices"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


@functools.lru_cache(maxsize=1)
def _digits_cached() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0  # pixel values 0..16 -> [0, 1]
    y = torch.as_tensor(data.target, dtype=torch.long)
    return x, y


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``load_digits`` as ``(X, y)``: ``X`` float32 of shape (1797, 64) in [0, 1], ``y`` int64 labels.

    Loaded once per process; each call returns fresh clones, so a test that writes into the
    tensors cannot leak into another.
    """
    x, y = _digits_cached()
    return x.clone(), y.clone()


def make_mlp(seed: int, hidden: int = 32, activation: str = "tanh") -> nn.Sequential:
    """A 64 -> ``hidden`` -> 10 MLP whose initial weights depend only on ``seed``.

    The global RNG is left untouched: the weights come from a private ``torch.Generator``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
            bound = layer.in_features**-0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    return model


def minibatch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index tensors of ``batch_size`` rows each, drawn from ``range(n)`` by a seeded generator.

    Sampling is with replacement across batches (each batch is a random subset without
    replacement), so two runs given the same seed see exactly the same batches.
    """
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator)[:batch_size] for _ in range(steps)]


@torch.no_grad()
def full_batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Cross-entropy of ``model`` on all of ``(x, y)``, in eval mode and without gradients."""
    was_training = model.training
    model.eval()
    try:
        return float(nn.functional.cross_entropy(model(x), y))
    finally:
        model.train(was_training)


def train_regression(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches,
    *,
    with_closure: bool,
    give_loss: bool = False,
    after_step=None,
) -> None:
    """Minimise the MSE of ``model`` on each ``(x, y)`` of ``batches``, one optimizer step each.

    ``with_closure`` picks ``opt.step(closure)`` or the closure-free ``backward(); opt.step()``
    (``opt.step(loss=loss)`` with ``give_loss``); ``after_step()``, if given, runs after every
    step (a scheduler's step, a recorder).
    """
    for x, y in batches:

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if with_closure:
            opt.step(closure)
        elif give_loss:
            opt.step(loss=closure())
        else:
            closure()
            opt.step()
        if after_step is not None:
            after_step()

"""Benchmark tasks on data that ships offline: nothing is downloaded at run time.

Three tasks, each with a train/test split, a model builder and a test metric:

- ``digits``: scikit-learn's 8x8 digits (bundled with scikit-learn), a two-layer MLP; accuracy.
- ``mnist1d``: the MNIST-1D generator of the ``mnist1d`` package (its ``make_dataset``, which
  builds the data from templates and a seed; the package's ``get_dataset`` would download a
  pickle, which is never called here), a small 1-D CNN; accuracy.
- ``charlm``: a byte-level language model, a two-layer causal transformer, on a fixed list of
  standard-library source files of the running Python (``sysconfig.get_paths()["stdlib"]``);
  the last tenth of the text is the test set; test loss in bits per byte (one byte = one
  character for these ASCII files).

The text of ``charlm`` depends on the Python version that runs it (3.11 here): compare its
numbers only between runs of the same Python (the sweep records the corpus size and hash).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split into train and test sets."""
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def digits_mlp(seed: int, hidden: int = 64) -> nn.Module:
    """A two-layer MLP for the digits task, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


# ---------------------------------------------------------------------------- MNIST-1D


def mnist1d(num_samples: int = 5000, seed: int = 42) -> tuple[torch.Tensor, ...]:
    """MNIST-1D built by its generator (no download): 40-sample signals of the 10 digits.

    ``num_samples`` and ``seed`` are the generator's own arguments (5000 and 42 are its
    defaults, the published dataset); the package's own 80/20 split is kept. Returns
    ``x_train (N, 1, 40), y_train, x_test, y_test``. About 5 s for 5000 samples: use
    :func:`mnist1d_cached` in training loops.
    """
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # make_dataset reseeds NumPy's global generator (mnist1d.utils.set_seed); give it back after.
    state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    x_train = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    return x_train, torch.tensor(data["y"]).long(), x_test, torch.tensor(data["y_test"]).long()


@functools.lru_cache(maxsize=1)
def mnist1d_cached() -> tuple[torch.Tensor, ...]:
    """The default MNIST-1D dataset, generated once per process."""
    return mnist1d()


def mnist1d_cnn(seed: int, channels: int = 32) -> nn.Module:
    """A small 1-D CNN for MNIST-1D (three convolutions, one linear head), from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 10, 10),
    )


# ---------------------------------------------------------------------------- byte-level LM

# A fixed list, so that the corpus is the same on every machine with the same Python.
STDLIB_FILES = (
    "collections/__init__.py",
    "textwrap.py",
    "json/decoder.py",
    "string.py",
    "functools.py",
    "heapq.py",
)


@functools.lru_cache(maxsize=1)
def stdlib_text() -> bytes:
    """The concatenated standard-library sources of :data:`STDLIB_FILES` (about 157 KB on 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"\n".join((root / name).read_bytes() for name in STDLIB_FILES)


def corpus_fingerprint() -> str:
    """Size and SHA-256 prefix of the text, recorded with the results."""
    text = stdlib_text()
    return f"{len(text)} bytes, sha256 {hashlib.sha256(text).hexdigest()[:12]}"


def char_corpus(context: int = 64, test_fraction: float = 0.1) -> tuple[torch.Tensor, ...]:
    """The text as bytes in non-overlapping windows: ``x_train, y_train, x_test, y_test``.

    ``y`` is ``x`` shifted by one byte. The test set is the tail of the text. The windows
    cover the whole training text once, so the "full training set" loss predicts every
    training byte once; training batches are drawn at random offsets instead (see
    :meth:`Dataset.sample`).
    """
    tokens = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    split = int(len(tokens) * (1 - test_fraction))
    return (*_windows(tokens[:split], context), *_windows(tokens[split:], context))


def _windows(tokens: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(tokens) - 1) // context
    x = tokens[: n * context].view(n, context)
    y = tokens[1 : n * context + 1].view(n, context)
    return x, y


class CharTransformer(nn.Module):
    """A small causal transformer over bytes: embeddings, pre-norm encoder layers, linear head."""

    def __init__(self, context: int = 64, d_model: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        # enable_nested_tensor only matters for padded batches and warns with norm_first.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.position[:t]
        h = self.encoder(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def char_transformer(seed: int) -> nn.Module:
    """The byte-level transformer (2 layers, d_model 64, 4 heads, context 64), from ``seed``."""
    torch.manual_seed(seed)
    return CharTransformer()


# ---------------------------------------------------------------------------- the common shape


@dataclass(frozen=True)
class Dataset:
    """A train/test split; ``stream`` (language models) holds the training text as one sequence."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    stream: torch.Tensor | None = None

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A random mini-batch (with replacement) drawn from ``generator`` only."""
        if self.stream is None and batch_size >= len(self.x_train):
            return self.x_train, self.y_train  # full batch: the whole training set every step
        if self.stream is None:
            idx = torch.randint(0, len(self.x_train), (batch_size,), generator=generator)
            return self.x_train[idx], self.y_train[idx]
        context = self.x_train.shape[1]
        # Random offsets, not just the evaluation windows: every position is a training example.
        starts = torch.randint(0, len(self.stream) - context - 1, (batch_size, 1), generator=generator)
        idx = starts + torch.arange(context + 1)
        windows = self.stream[idx]
        return windows[:, :-1], windows[:, 1:]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, for class logits ``(B, C)`` and sequence logits ``(B, T, C)`` alike."""
    return nn.functional.cross_entropy(output.flatten(0, -2), target.flatten())


@dataclass(frozen=True)
class Task:
    """A benchmark task: data, model, batch size, budgets (gradient evaluations) and test metric.

    ``metric`` is ``"accuracy"`` (higher is better), ``"test bits/byte"`` or ``"test loss"``
    (lower is better). ``loss`` is the training loss (mean cross-entropy unless given).
    """

    name: str
    title: str
    load: Callable[[], Dataset]
    model: Callable[[int], nn.Module]
    batch_size: int
    budget: int
    quick_budget: int
    metric: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset, chunk: int = 1024) -> tuple[float, float]:
        """Final training loss on the full training set and the test metric, in eval mode."""
        was_training = model.training
        model.eval()
        try:
            train_loss = _mean_loss(model, data.x_train, data.y_train, chunk, self.loss)
            if self.higher_is_better:
                correct = sum(
                    int((model(x).argmax(-1) == y).sum())
                    for x, y in zip(data.x_test.split(chunk), data.y_test.split(chunk))
                )
                metric = correct / len(data.y_test)
            else:
                metric = _mean_loss(model, data.x_test, data.y_test, chunk, self.loss)
                if self.metric == "test bits/byte":
                    metric /= math.log(2)
        finally:
            model.train(was_training)
        return train_loss, metric


def _mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, loss: Callable = loss_fn) -> float:
    total = 0.0
    for xc, yc in zip(x.split(chunk), y.split(chunk)):
        total += float(loss(model(xc), yc)) * yc.numel()
    return total / y.numel()


def _digits_dataset() -> Dataset:
    return Dataset(*digits())


def _mnist1d_dataset() -> Dataset:
    return Dataset(*mnist1d_cached())


@functools.lru_cache(maxsize=1)
def _charlm_dataset() -> Dataset:
    x_train, y_train, x_test, y_test = char_corpus()
    tokens = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    stream = tokens[: int(len(tokens) * 0.9)]  # the same split as char_corpus
    return Dataset(x_train, y_train, x_test, y_test, stream=stream)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("digits", "Digits MLP (64-64-10, tanh)", _digits_dataset, digits_mlp, 128, 700, 400, "accuracy"),
        Task("mnist1d", "MNIST-1D, 1-D CNN", _mnist1d_dataset, mnist1d_cnn, 64, 1500, 400, "accuracy"),
        Task(
            "charlm",
            "Byte-level transformer on stdlib sources",
            _charlm_dataset,
            char_transformer,
            16,
            800,
            200,
            "test bits/byte",
        ),
    )
}

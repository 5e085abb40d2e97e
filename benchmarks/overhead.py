"""What ``Newt`` costs: seconds per step and memory against the bare inner optimizer, per mode.

Run ``python -m benchmarks.overhead`` (a few minutes on 2 CPU cores). For an MLP on the
digits data and a small character-level transformer, it times a training step of:

- the bare inner optimizer (Adam): closure (forward + backward), then ``inner.step()``;
- ``Newt`` in lookahead mode, lazy mode (``update_every=4``) and closure-free mode.

The methods are interleaved, repetition by repetition (four steps each: one cycle of the lazy
mode), so that a busy machine slows them all alike; the table reports the median seconds per
step and its ratio to the bare step, measured in one run. It also
reports the time spent in ``Newt.step`` outside the closure and the inner step (Newt's own
bookkeeping: snapshot copy, dot products, synchronisation), as a share of the bare step, and the
number of parameter-sized buffers Newt keeps (its snapshot), counted from the tensors it holds.

``--tasks transformer-large`` adds a 19M-parameter transformer, meant for a GPU.
``--device cuda`` runs the same on a GPU (synchronising before and after each repetition) and
adds each method's peak GPU memory against the bare optimizer's, measured one method at a time
on a fresh copy of the model. There the "own work" column is left out: kernels run
asynchronously, so the time a host-side timer puts outside the closure includes waiting, at
``Newt``'s one synchronisation, for the closure's and the inner step's kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.tasks import digits, digits_mlp
from newt import Newt

STEPS_PER_REPETITION = 4
"""Each timed repetition is four consecutive steps, one whole cycle of the lazy mode."""


class CharTransformer(nn.Module):
    """A small causal transformer over bytes (2 layers, width 128, context 128)."""

    def __init__(self, width: int = 128, layers: int = 2, context: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


def _mlp_task(device: str = "cpu"):
    x, y, _, _ = digits()
    torch.manual_seed(0)
    model = digits_mlp(0, hidden=256).to(device)
    batch = (x[:256].to(device), y[:256].to(device))
    return model, lambda: nn.functional.cross_entropy(model(batch[0]), batch[1])


def _transformer_task(device: str = "cpu", width: int = 128, layers: int = 2, context: int = 128, batch: int = 16):
    torch.manual_seed(0)
    model = CharTransformer(width, layers, context).to(device)
    text = torch.tensor(list(open(nn.__file__.replace("nn/__init__.py", "optim/adam.py"), "rb").read()))
    starts = torch.randint(0, len(text) - context - 1, (batch,), generator=torch.Generator().manual_seed(0))
    windows = torch.stack([text[s : s + context + 1] for s in starts.tolist()])
    inputs, targets = windows[:, :-1].to(device), windows[:, 1:].to(device)
    return model, lambda: nn.functional.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))


def _large_transformer_task(device: str = "cpu"):
    """6 layers of width 512, context 256, batch 32 (19M parameters): for a GPU, not in the defaults."""
    return _transformer_task(device, width=512, layers=6, context=256, batch=32)


TASKS = {"mlp": _mlp_task, "transformer": _transformer_task, "transformer-large": _large_transformer_task}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _newts(inner: torch.optim.Optimizer) -> dict[str, Newt]:
    """The three modes timed against the bare optimizer, all around the same ``inner``."""
    # The lookahead steps must not be rejected or reshape the rate, nor lazy mode's first steps
    # all be lookahead steps while the start is unproven: the timing is about the work.
    untested = dict(spike_threshold=float("inf"), start_armijo=0.0)
    return {
        "Newt lookahead": Newt(inner, strategy="taylor", **untested),
        "Newt lazy K=4": Newt(inner, strategy="taylor", update_every=4, **untested),
        "Newt closure-free": Newt(inner, strategy="retsinas"),
    }


def _runners(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: str = "cpu"):
    """One step function per method; each returns the seconds Newt spent outside closure and inner step."""
    state = {name: {k: v.clone() for k, v in model.state_dict().items()} for name in ("bare", "la", "lazy", "cf")}
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    closure_seconds = [0.0]

    def closure() -> torch.Tensor:
        start = time.perf_counter()
        inner.zero_grad()
        loss = loss_fn()
        loss.backward()
        closure_seconds[0] += time.perf_counter() - start
        return loss

    inner_seconds = [0.0]
    original_step = inner.step

    def timed_inner_step(*args, **kwargs):
        start = time.perf_counter()
        result = original_step(*args, **kwargs)
        inner_seconds[0] += time.perf_counter() - start
        return result

    inner.step = timed_inner_step
    newts = _newts(inner)
    lookahead, lazy, closure_free = newts.values()

    def measured(name: str, body: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            model.load_state_dict(state[name])  # every method trains its own copy of the weights
            closure_seconds[0] = inner_seconds[0] = 0.0
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(STEPS_PER_REPETITION):
                body()
            _synchronize(device)
            total = (time.perf_counter() - start) / STEPS_PER_REPETITION
            outside = total - (closure_seconds[0] + inner_seconds[0]) / STEPS_PER_REPETITION
            state[name] = {k: v.clone() for k, v in model.state_dict().items()}
            return total, outside

        return run

    def bare() -> None:
        closure()
        inner.step()

    def closure_free_step() -> None:
        closure()
        closure_free.step()

    return {
        "bare Adam": measured("bare", bare),
        "Newt lookahead": measured("la", lambda: lookahead.step(closure)),
        "Newt lazy K=4": measured("lazy", lambda: lazy.step(closure)),
        "Newt closure-free": measured("cf", closure_free_step),
    }, (lookahead, lazy, closure_free)


def peak_memory(task: str, method: str, steps: int = 2 * STEPS_PER_REPETITION) -> int:
    """Peak GPU bytes allocated while ``method`` trains a fresh copy of ``task``'s model, above
    what was allocated before the model existed (so: model, gradients, optimizer state, Newt's
    snapshot and the activations of a step)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, loss_fn = TASKS[task]("cuda")
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = inner if method == "bare Adam" else _newts(inner)[method]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(steps):
        if method in ("bare Adam", "Newt closure-free"):
            closure()
            opt.step()
        else:
            opt.step(closure)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(task: str, repeats: int, device: str = "cpu") -> None:
    model, loss_fn = TASKS[task](device)
    runners, newts = _runners(model, loss_fn, device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    own: dict[str, list[float]] = {name: [] for name in runners}
    for repetition in range(repeats + 3):
        for name, run in runners.items():
            total, outside = run()
            if repetition >= 3:  # warm-up: allocators, lazy state, the first closure-free step
                times[name].append(total)
                own[name].append(outside)
    parameters = sum(p.numel() for p in model.parameters())
    bare = statistics.median(times["bare Adam"])
    print(f"\n{task} on {device}: {parameters:,} parameters, {repeats} interleaved repetitions of 4 steps, medians")
    if device == "cuda":
        peaks = {name: peak_memory(task, name) for name in runners}
        print("| method | seconds per step | ratio to bare | peak GPU memory | ratio to bare |")
    else:
        print("| method | seconds per step | ratio to bare | Newt's own work (share of bare step) |")
    print("|---|---:|---:|---:|" + ("---:|" if device == "cuda" else ""))
    for name in runners:
        median = statistics.median(times[name])
        if device == "cuda":
            last = f"{peaks[name] / 2**20:.1f} MiB | {peaks[name] / peaks['bare Adam']:.3f}"
        else:
            last = "" if name == "bare Adam" else f"{statistics.median(own[name]) / bare:.3f}"
        print(f"| {name} | {median * 1e3:.2f} ms | {median / bare:.3f} | {last} |")
    for newt in newts:
        held = sum(t.numel() for t in (newt._snapshot or []))
        print(f"parameter-sized buffers held by {newt!r:.60}: {held / parameters:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--tasks", nargs="+", default=["mlp", "transformer"], choices=list(TASKS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(1)
    for task in args.tasks:
        measure(task, args.repeats, args.device)


if __name__ == "__main__":
    main()

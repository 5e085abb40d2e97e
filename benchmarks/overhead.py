"""What ``Newt`` costs: seconds per step and memory against the bare inner optimizer, per mode.

Run ``python -m benchmarks.overhead`` (a few minutes on 2 CPU cores). For an MLP on the
digits data and a small character-level transformer, it times a training step of:

- the bare inner optimizer (Adam): closure (forward + backward), then ``inner.step()``;
- the closure alone (forward and backward), and a forward pass alone (no autograd), the cost
  of a forward-only lookahead call: the ratio of the two is printed;
- ``Newt`` in lookahead mode and closure-free mode (each with its defaults, and without the
  check of non-finite numbers that ``reject_nonfinite=True`` makes before the inner step), lazy
  mode (``update_every=4``), and closure-free mode in blocks of four (``update_every=4``: one host
  synchronisation per four steps, which shows on a GPU what the one per step of closure-free
  mode costs);
- the measurements that read no gradient at the lookahead point: ``gen`` with
  ``forward_only=True``, ``gen-three-point`` (two forward-only calls), and ``gen-exact`` (a
  forward-only call, then one at ``theta_t`` with a double backward), also lazy (K=4).

Each method trains its own copy of the weights with its own Adam.

The methods are interleaved, repetition by repetition (four steps each: one cycle of the lazy
mode), so that a busy machine slows them all alike; the table reports the median seconds per
step and its ratio to the bare step, measured in one run. It also
reports the time spent in ``Newt.step`` outside the closure and the inner step (Newt's own
bookkeeping: snapshot copy, dot products, synchronisation), as a share of the bare step, and the
number of parameter-sized buffers Newt keeps (its snapshot), counted from the tensors it holds.

Peak memory, against the bare optimizer's, is measured one method at a time on a fresh copy of
the model (model, gradients, optimizer state, Newt's snapshot and a step's activations). On the
CPU it is the peak of the bytes the C heap holds (glibc's ``mallinfo2``, where PyTorch's CPU
tensors live), read after every tensor operation through a ``TorchDispatchMode``, minus what it
held before the model was built; elsewhere than glibc the column is left out.

``--tasks transformer-large`` adds a 19M-parameter transformer, meant for a GPU.
``--device cuda`` runs the same on a GPU (synchronising before and after each repetition), with
peak GPU memory from PyTorch's allocator. There the "own work" column is left out: kernels run
asynchronously, so the time a host-side timer puts outside the closure includes waiting, at
``Newt``'s one synchronisation, for the closure's and the inner step's kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.tasks import digits, digits_mlp
from newt import RULES, Newt

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


def _newts(make_inner: Callable[[], torch.optim.Optimizer]) -> dict[str, Newt]:
    """The modes timed against the bare optimizer, each around its own ``make_inner()``."""
    # The lookahead steps must not be rejected or reshape the rate, nor lazy mode's first steps
    # all be lookahead steps while the start is unproven: the timing is about the work.
    untested = dict(spike_threshold=float("inf"), start_armijo=0.0)
    return {
        "Newt lookahead": Newt(make_inner(), strategy="taylor", **untested),
        # without the check of theta_t's loss and gradients (and of its host synchronisation)
        # that reject_nonfinite=True makes before the inner step: the cost of that check
        "Newt lookahead, no NaN check": Newt(make_inner(), strategy="taylor", reject_nonfinite=False, **untested),
        # the rules that read no gradient at the lookahead point, and GeN's two versions
        "Newt lookahead gen, forward only": Newt(make_inner(), strategy="gen", forward_only=True, **untested),
        "Newt gen-three-point": Newt(make_inner(), strategy="gen-three-point", **untested),
        "Newt gen-exact": Newt(make_inner(), strategy="gen-exact", **untested),
        "Newt lazy K=4": Newt(make_inner(), strategy="taylor", update_every=4, **untested),
        "Newt gen-exact lazy K=4": Newt(make_inner(), strategy="gen-exact", update_every=4, **untested),
        "Newt closure-free": Newt(make_inner(), strategy="retsinas"),
        "Newt closure-free, no NaN check": Newt(make_inner(), strategy="retsinas", reject_nonfinite=False),
        "Newt closure-free K=4": Newt(make_inner(), strategy="retsinas", update_every=4),
    }


def _closure_free(name: str) -> bool:
    return name.startswith("Newt closure-free")


def _runners(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: str = "cpu"):
    """One step function per method; each returns the seconds Newt spent outside closure and inner step.

    Every method trains its own copy of the weights with its own Adam: a run is one method's
    training, interleaved with the others' only in time. "forward pass" times the closure's
    forward alone, without autograd: what a forward-only lookahead call costs.
    """
    closure_seconds, inner_seconds = [0.0], [0.0]

    def closure() -> torch.Tensor:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        closure_seconds[0] += time.perf_counter() - start
        return loss

    def timed_adam() -> torch.optim.Optimizer:
        inner = torch.optim.Adam(model.parameters(), lr=1e-3)
        original_step = inner.step

        def timed_inner_step(*args, **kwargs):
            start = time.perf_counter()
            result = original_step(*args, **kwargs)
            inner_seconds[0] += time.perf_counter() - start
            return result

        inner.step = timed_inner_step
        return inner

    inner = timed_adam()
    newts = _newts(timed_adam)
    state = {name: {k: v.clone() for k, v in model.state_dict().items()} for name in ("bare Adam", *newts)}

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

    def forward() -> None:
        with torch.no_grad():
            loss_fn()

    def step_of(name: str, newt: Newt) -> Callable[[], None]:
        if not _closure_free(name):
            return lambda: newt.step(closure)

        def step() -> None:
            closure()
            newt.step()

        return step

    runners = {
        "bare Adam": measured("bare Adam", bare),
        "forward and backward": measured("bare Adam", closure),
        "forward pass": measured("bare Adam", forward),
    }
    runners.update({name: measured(name, step_of(name, newt)) for name, newt in newts.items()})
    return runners, newts


def _supported(runners: dict, newts: dict[str, Newt]) -> None:
    """Drop the methods whose first step raises on this model, saying why (``gen-exact`` needs a
    second derivative of every operation, which some kernels lack)."""
    for name in [n for n in newts if "gen-exact" in n]:
        try:
            runners[name]()
        except RuntimeError as error:
            del runners[name], newts[name]
            print(f"{name}: not run on this model: {str(error).splitlines()[0][:200]}")


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2, in order: ten size_t counters
    _names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in _names.split()]


def _heap_reader() -> Callable[[], int] | None:
    """Bytes the C heap holds now (glibc's ``mallinfo2``: in-use chunks plus mmapped ones), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def held() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return held


HEAP_BYTES = _heap_reader()


class _HeapPeak(TorchDispatchMode):
    """The largest heap size seen right after any tensor operation (where allocations peak)."""

    def __init__(self, held: Callable[[], int]) -> None:
        super().__init__()
        self.held = held
        self.peak = held()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.held())
        return out


@contextlib.contextmanager
def _peak_bytes(device: str) -> Iterator[Callable[[], int]]:
    """Measure the peak memory of the body above what was held at its start; yields a reader."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield lambda: torch.cuda.max_memory_allocated() - before
        return
    assert HEAP_BYTES is not None
    before = HEAP_BYTES()
    with _HeapPeak(HEAP_BYTES) as mode:
        yield lambda: mode.peak - before


def peak_memory(task: str, method: str, device: str = "cuda", steps: int = 2 * STEPS_PER_REPETITION) -> int:
    """Peak bytes allocated while ``method`` trains a fresh copy of ``task``'s model, above what
    was allocated before the model existed (so: model, gradients, optimizer state, Newt's
    snapshot and the activations of a step)."""
    with _peak_bytes(device) as peak:
        model, loss_fn = TASKS[task](device)
        make_inner = lambda: torch.optim.Adam(model.parameters(), lr=1e-3)  # noqa: E731
        opt = make_inner() if method == "bare Adam" else _newts(make_inner)[method]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        for _ in range(steps):
            if method == "bare Adam" or _closure_free(method):
                closure()
                opt.step()
            else:
                opt.step(closure)
        if device == "cuda":
            torch.cuda.synchronize()
    return peak()


def measure(task: str, repeats: int, device: str = "cpu") -> None:
    model, loss_fn = TASKS[task](device)
    runners, newts = _runners(model, loss_fn, device)
    _supported(runners, newts)
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
    peaks = None
    if device == "cuda" or HEAP_BYTES is not None:
        peak_memory(task, "bare Adam", device)  # once unmeasured: first-use caches must not count as the bare peak
        peaks = {name: peak_memory(task, name, device) for name in runners if not name.startswith("forward")}
    header = "| method | seconds per step | ratio to bare |"
    if device != "cuda":
        header += " Newt's own work (share of bare step) |"
    if peaks is not None:
        header += f" peak {'GPU' if device == 'cuda' else 'heap'} memory | ratio to bare |"
    print(header)
    print("|---|" + "---:|" * (header.count("|") - 2))
    for name in runners:
        median = statistics.median(times[name])
        cells = [f"{median * 1e3:.2f} ms", f"{median / bare:.3f}"]
        if device != "cuda":
            cells.append("" if not name.startswith("Newt") else f"{statistics.median(own[name]) / bare:.3f}")
        if peaks is not None and name in peaks:
            cells += [f"{peaks[name] / 2**20:.2f} MiB", f"{peaks[name] / peaks['bare Adam']:.3f}"]
        elif peaks is not None:
            cells += ["", ""]
        print(f"| {name} | " + " | ".join(cells) + " |")
    forward = statistics.median(times["forward pass"]) / statistics.median(times["forward and backward"])
    print(f"a forward pass costs {forward:.3f} of a forward and backward pass")
    for name, newt in newts.items():
        held = sum(t.numel() for t in newt.snapshot) / parameters
        # the strategies that visit a point off the lookahead keep the lookahead point in a second one
        if RULES.get(str(newt.strategy), RULES["gen"]).lookahead in ("hessian", "three-point"):
            held += 1.0
        print(f"parameter-sized buffers held by {name}: {held:.2f}")


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

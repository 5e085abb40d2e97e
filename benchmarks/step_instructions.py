"""Instructions per training step, counted by valgrind's callgrind: Newt's fixed cost without the noise.

Run ``python -m benchmarks.step_instructions`` (needs ``valgrind``, Debian's package; about 25
minutes on 2 cores). On the digits MLP of ``benchmarks.overhead`` (19,210 parameters, batch 256,
Adam, one thread) it counts the instructions of a bare Adam step (closure, then ``inner.step()``),
a lookahead step and a closure-free step, each as the difference between a run of 220 steps and
a run of 20 (which cancels the start-up: imports, the first steps), with the garbage collector
off during the steps and a fixed hash seed. What a busy machine does to timings does not touch
these counts, so they compare two versions of the code (``--source DIR`` imports ``newt`` from
another checkout); they still move a little between runs, because the start-up does.
Instructions are not seconds (a cache miss costs more than an add): the seconds stay with
``benchmarks.overhead``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("bare", "lookahead", "closure-free")
SHORT, LONG = 20, 220


def _workload(mode: str, steps: int, source: str) -> None:
    """The measured program: ``steps`` training steps in ``mode``, with ``newt`` from ``source``."""
    sys.path[:0] = [source, str(REPO)]
    import torch
    from torch import nn

    from benchmarks.tasks import digits_mlp
    from newt import Newt

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 64, generator=generator), torch.randint(0, 10, (256,), generator=generator)
    torch.manual_seed(0)
    model = digits_mlp(0, hidden=256)
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = {
        "bare": inner,
        "lookahead": Newt(inner, strategy="taylor", spike_threshold=float("inf"), start_armijo=0.0),
        "closure-free": Newt(inner, strategy="retsinas"),
    }[mode]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    # A collection of the old generations (torch holds many objects) costs tens of millions of
    # instructions and falls into one run's window and not the other's: none during the steps.
    gc.collect()
    gc.disable()
    for _ in range(steps):
        if mode == "lookahead":
            opt.step(closure)
        else:
            closure()
            opt.step()


def _count(mode: str, steps: int, source: str) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
    command += ["--source", source, "--run", mode, str(steps)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return int(re.search(r"Collected : (\d+)", result.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO), help="a checkout to import newt from (default: this one)")
    parser.add_argument("--run", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        _workload(args.run[0], int(args.run[1]), args.source)
        return
    jobs = {(mode, steps): None for mode in MODES for steps in (SHORT, LONG)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_count, *key, args.source) for key in jobs}
        counts = {key: future.result() for key, future in futures.items()}
    per_step = {mode: (counts[(mode, LONG)] - counts[(mode, SHORT)]) / (LONG - SHORT) for mode in MODES}
    print(f"newt from {args.source}; instructions per step (callgrind), digits MLP, Adam")
    print("| step | instructions | ratio to bare |")
    print("|---|---:|---:|")
    for mode in MODES:
        print(f"| {mode} | {per_step[mode] / 1e6:.3f}M | {per_step[mode] / per_step['bare']:.3f} |")


if __name__ == "__main__":
    main()

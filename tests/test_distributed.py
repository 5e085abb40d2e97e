"""Newt under torch.distributed: every rank applies the same rate, and training matches one process.

Two processes with the ``gloo`` backend on CPU train a float64 MLP on equal halves of each
global batch, with the model wrapped in DDP (replicated parameters) or FSDP2's ``fully_shard``
(DTensor parameters, sharded across the ranks). For every strategy and mode the test checks:

- the rates and the parameters are bit-identical across the ranks at every step;
- they match a single process trained on the whole batches, to a tight tolerance (the
  averages over ranks round differently from a full-batch mean, nothing more).

One spawn runs every configuration, so the process start-up is paid once.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp
import torch.multiprocessing as mp
from torch import nn

from newt import Newt
from newt.distributed import local_tensor, sharded

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 24
GLOBAL_BATCH = 32


@dataclass(frozen=True)
class Config:
    wrapper: str  # "ddp" or "fsdp"
    strategy: str
    # "lookahead", "lookahead-clip", "lookahead-forward", "lazy", "lazy-rise", "closure-free" or "closure-free-loss"
    mode: str

    @property
    def id(self) -> str:
        return f"{self.wrapper}-{self.strategy}-{self.mode}"

    def newt_options(self) -> dict:
        options = {"strategy": self.strategy}
        if self.mode in ("lazy", "lazy-rise"):
            options["update_every"] = 3
        if self.mode == "lookahead-clip":  # Newt's own clipping, which bites at every step here
            options["max_grad_norm"] = 0.01
        if self.mode == "lookahead-forward":
            options["forward_only"] = True
        elif self.wrapper == "fsdp" and self.strategy == "gen" and not self.mode.startswith("closure-free"):
            # what gen does on DTensor parameters by itself, said here for the one-process reference
            options["forward_only"] = False
        return options


FREE_MODES = ("closure-free", "closure-free-loss")
CONFIGS = [
    *(Config(w, s, m) for w in ("ddp", "fsdp") for s in ("retsinas", "taylor", "gen") for m in ("lookahead", "lazy")),
    *(Config(w, s, m) for w in ("ddp", "fsdp") for s in ("retsinas", "gen") for m in FREE_MODES),
    *(Config(w, "gen", "lazy-rise") for w in ("ddp", "fsdp")),
    *(Config(w, "gen", "lookahead-clip") for w in ("ddp", "fsdp")),
    # the calls without a backward pass: under DDP only (FSDP2 refuses them, see below; its
    # default gen measures the lookahead's gradient)
    Config("ddp", "gen", "lookahead-forward"),
    *(Config("ddp", s, m) for s in ("gen-three-point", "gen-exact") for m in ("lookahead", "lazy")),
]
# FSDP2 became public as torch.distributed.fsdp.fully_shard after torch 2.4, whose private one
# (torch.distributed._composable.fsdp) asks for CUDA streams even on a gloo CPU mesh.
PUBLIC_FSDP2 = hasattr(torch.distributed.fsdp, "fully_shard")
RUNNABLE = [c for c in CONFIGS if c.wrapper == "ddp" or PUBLIC_FSDP2]
PARAMS = [
    pytest.param(c, id=c.id, marks=() if c in RUNNABLE else pytest.mark.skip(reason="no public FSDP2 in this torch"))
    for c in CONFIGS
]
FAR_TOO_LARGE = 1.0
"""The start of the ``closure-free-loss`` runs: its first step is undone by the start-up test."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()


RISE_STEP = 10
"""In the ``lazy-rise`` runs, a plain step (K = 3) where rank 0's half of the batch has a far higher
loss, rank 1's does not: only their mean decides, so both ranks measure the step."""


def _batches(rise: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(GLOBAL_BATCH, 8, generator=gen, dtype=torch.float64), torch.randn(GLOBAL_BATCH, 1, generator=gen))
        for _ in range(STEPS)
    ]
    if rise:
        x, y = batches[RISE_STEP]
        y = y.clone()
        y[: GLOBAL_BATCH // WORLD] += 10.0  # rank 0's half: a loss about 100 times the others'
        batches[RISE_STEP] = (x, y)
    return batches


class ReductionCounter:
    """Counts the ``all_reduce`` calls ``newt.distributed`` makes, while installed (DDP and FSDP2
    make their own collectives elsewhere: those are not counted)."""

    def __init__(self) -> None:
        self.count = 0
        self._original = dist.all_reduce

    def __enter__(self) -> ReductionCounter:
        def counted(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "newt.distributed":
                self.count += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._original


def _train(
    model: nn.Module, config: Config, batches, shard: slice
) -> tuple[list[float], list[torch.Tensor], int, list[int], list[tuple[int, bool, bool]]]:
    """Train; return the rate after each step, the final full parameters, the undone steps, the
    closure calls of each step, and each step's reductions, whether the start was proven and
    whether a closure-free measurement was waiting."""
    lr = FAR_TOO_LARGE if config.mode == "closure-free-loss" else 1e-3
    opt = Newt(torch.optim.Adam(model.parameters(), lr=lr), **config.newt_options())
    rates, calls, reductions = [], [], []
    for x, y in batches:
        xb, yb = x[shard], y[shard].double()
        calls.append(0)
        before = opt.state_dict()["newt"]
        proven_before, pending_before = before["start_proven"], before["pending"] is not None
        counter = ReductionCounter().__enter__()

        def closure():
            calls[-1] += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            return loss

        if config.mode == "closure-free":
            closure()
            opt.step()
        elif config.mode == "closure-free-loss":  # each rank gives its own half-batch's loss
            opt.step(loss=closure())
        else:
            opt.step(closure)
        counter.__exit__()
        reductions.append((counter.count, proven_before, pending_before))
        rates.append(opt.param_groups[0]["lr"])
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    return rates, [t.detach().clone() for t in full], opt.state_dict()["newt"]["rejected"], calls, reductions


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # A rank that dies leaves the other in a collective: fail in a minute, not gloo's default half hour.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        half = GLOBAL_BATCH // WORLD
        shard = slice(rank * half, (rank + 1) * half)
        results = {}
        for config in RUNNABLE:
            model = _model()
            if config.wrapper == "ddp":
                model = nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                # On the CPU like the data: by default fully_shard moves the model to the GPU
                # when the machine has one, and the gloo test then mixes devices.
                mesh = init_device_mesh("cpu", (WORLD,))
                for layer in (model[0], model[2]):
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
            results[config.id] = _train(model, config, _batches(config.mode == "lazy-rise"), shard)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("config", PARAMS)
def test_every_rank_applies_the_same_rate_and_holds_the_same_parameters(distributed_results, config):
    (rates0, params0, undone0, calls0, _), (rates1, params1, undone1, calls1, _) = (
        r[config.id] for r in distributed_results
    )
    assert rates0 == rates1 and undone0 == undone1 and calls0 == calls1
    assert len(set(rates0)) > 1  # the rate did adapt
    assert (undone0 > 0) == (config.mode == "closure-free-loss")  # the start-up test acted there
    if config.mode.startswith("lazy"):  # the step whose loss rose sharply was measured on both ranks
        assert calls0[RISE_STEP] == (2 if config.mode == "lazy-rise" else 1)
    for a, b in zip(params0, params1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", PARAMS)
def test_distributed_training_matches_one_process_on_the_whole_batch(distributed_results, config):
    rates, params, undone, calls, _ = distributed_results[0][config.id]
    batches = _batches(config.mode == "lazy-rise")
    single_rates, single_params, single_undone, single_calls, _ = _train(_model(), config, batches, slice(None))
    assert rates == pytest.approx(single_rates, rel=1e-9) and undone == single_undone and calls == single_calls
    for a, b in zip(params, single_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("config", PARAMS)
def test_a_step_makes_one_reduction_beyond_the_start_and_the_rise_check(distributed_results, config):
    """One ``all_reduce`` carries every scalar of a step, and one more, of a flag, says whether
    every rank's loss and gradients at ``theta_t`` are finite (``reject_nonfinite=True``, the
    default) before the inner step. The exceptions: a closure-free step
    with no previous step to complete measures nothing (none); while the start is on probation,
    a closure-free step given the loss reads the loss first (one more, and none after it when
    the start-up test undoes the step); a plain step whose loss rose sharply reads its loss,
    then is measured (two)."""
    reductions = distributed_results[0][config.id][4]
    for step, (count, proven, pending) in enumerate(reductions):
        count -= 1  # the check of theta_t's numbers before the inner step (reject_nonfinite=True)
        if config.mode == "closure-free-loss" and not proven:
            assert 1 <= count <= 1 + pending, (step, count, pending)
        elif config.mode.startswith("closure-free"):
            assert count == int(pending), (step, count, pending)
        else:
            assert count == (2 if config.mode == "lazy-rise" and step == RISE_STEP else 1), (step, count)


def test_dtensor_parameters_count_as_sharded_and_give_their_local_shard() -> None:
    """FSDP2's parameters are DTensors: their dot products are partial sums, to be summed across ranks.

    Checked on a one-rank mesh in this process, so on every torch that has DTensor (which moved
    from ``torch.distributed._tensor`` to ``torch.distributed.tensor`` in 2.5): a DTensor that
    ``newt.distributed`` failed to import would count as replicated, silently.
    """
    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.arange(6.0).reshape(3, 2)
        shard = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        replica = nn.Parameter(distribute_tensor(full, mesh, [Replicate()]))
        plain = nn.Parameter(full.clone())
        assert sharded([plain, shard]) and not sharded([plain, replica]) and not sharded([plain])
        local = local_tensor(shard)
        assert type(local) is torch.Tensor and torch.equal(local, full)  # one rank holds the whole shard
        assert local_tensor(plain) is plain
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("strategy", "forward_only"), [("gen-exact", None), ("gen-three-point", None), ("gen", True)]
)
def test_calls_without_a_backward_pass_are_refused_on_dtensor_parameters_before_anything_moves(
    strategy, forward_only
) -> None:
    """FSDP2 may keep a module's all-gathered parameters until its backward pass: a forward-only
    call could leave the next calls computing with stale copies, and the Hessian-vector product
    does not reduce across ranks. The default gen measures the lookahead's gradient there."""
    try:
        from torch.distributed.tensor import Shard, distribute_tensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = nn.Parameter(distribute_tensor(torch.ones(3, 2, dtype=torch.float64), mesh, [Shard(0)]))
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = (weight.full_tensor() ** 2).sum()
            loss.backward()
            return loss

        opt = Newt(torch.optim.SGD([weight], lr=0.1), strategy, forward_only=forward_only)
        with pytest.raises(ValueError, match="forward_only unset"):
            opt.step(closure)
        assert not calls and torch.equal(weight.full_tensor(), torch.ones(3, 2, dtype=torch.float64))
        opt = Newt(torch.optim.SGD([weight], lr=0.1))  # the default: the gradient is measured
        backwards = []
        weight.register_hook(lambda g: backwards.append(1) or g)
        opt.step(closure)
        assert len(calls) == 2 and len(backwards) == 2
    finally:
        dist.destroy_process_group()

"""Train an MLP on scikit-learn's digits with DDP and Newt, on CPU or GPU (one per rank).

    torchrun --nproc_per_node=2 examples/ddp_digits.py            # DDP
    torchrun --nproc_per_node=2 examples/ddp_digits.py --fsdp     # FSDP2 (fully_shard)

Each rank trains on its own half of every global batch; Newt averages the losses and reduces
the dot products across the ranks in one all_reduce per step, so every rank applies the same
rate. Rank 0 prints the rate and the loss; at the end every rank checks that its parameters
equal rank 0's.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

from newt import Newt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="shard the parameters with FSDP2 instead of DDP")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-5, help="the initial rate: Newt adapts it")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)  # one GPU per rank: NCCL and fully_shard use the current device

    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(labels, device=device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = Newt(torch.optim.Adam(model.parameters(), lr=args.lr))

    batches = torch.Generator().manual_seed(1)  # the same global batches on every rank
    for step in range(args.steps):
        index = torch.randint(0, len(x), (128,), generator=batches).to(device)
        mine = index.chunk(world)[rank]  # this rank's share of the global batch

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[mine]), y[mine])
            loss.backward()
            return loss

        opt.step(closure)
        if rank == 0 and step % 20 == 0:
            info = opt.step_info
            print(f"step {step:4d}  loss {info.f0:.4f}  lr {opt.param_groups[0]['lr']:.3g}  ({info.decision})")

    flat = torch.cat(
        [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten() for p in model.parameters()]
    )
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    assert torch.equal(flat, reference), f"rank {rank} holds different parameters from rank 0"
    if rank == 0:
        print(f"all {world} ranks hold identical parameters; final rate {opt.param_groups[0]['lr']:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

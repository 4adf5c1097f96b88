"""Train a small backbone with a class-parallel L-Softmax head on synthetic data.

    torchrun --nproc-per-node 2 examples/train_class_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/train_class_parallel.py --device cuda  # one GPU per rank, NCCL

The backbone is data-parallel (DistributedDataParallel: every rank has a copy, gradients
averaged); the head's (C, D) class weights are sharded by class
(:class:`~lsoftmax_core.adapters.torch.ClassParallelLSoftmaxLoss`: rank r holds its
classes' rows) and stay out of DDP.  Each rank draws its own batch; the loss printed is
the loss of the global batch (all ranks' rows), the same on every rank.  ``--save PATH``
writes the full head checkpoint (the format of ``LSoftmaxLoss``, loadable at any world
size) from rank 0 at the end.

The data: every class has a random centre in input space; a sample is its class's centre
plus noise, so the backbone can learn to separate them.  ``--device cuda`` runs the CuPy
backend's class shards over NCCL (not yet run on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--in-features", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64, help="embedding size D")
    parser.add_argument("--batch", type=int, default=64, help="rows per rank and step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--margin", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--save", help="write the full head checkpoint here (rank 0)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a collective waits for the other ranks before it fails (torch's default: "
                             "30 minutes with gloo, 10 with NCCL)")  # fmt: skip
    args = parser.parse_args()

    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT (and LOCAL_RANK) for the default init.
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A rank that stops (an exception, a hung data loader) leaves the others waiting in the
    # head's next collective until this timeout, then they fail (docs/distributed.md).
    timeout = datetime.timedelta(seconds=args.timeout)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    # The class centres are the same on every rank (one seed); each rank's samples differ.
    centres = torch.randn(args.classes, args.in_features, generator=torch.Generator().manual_seed(0)) * 2
    samples = torch.Generator().manual_seed(1 + rank)

    torch.manual_seed(0)  # the same backbone everywhere (DDP also broadcasts rank 0's)
    backbone = nn.Sequential(nn.Linear(args.in_features, 128), nn.ReLU(), nn.Linear(128, args.dim)).to(device)
    backbone = DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(1 + rank)  # each rank initialises its own shard
    head = ClassParallelLSoftmaxLoss(
        args.dim, args.classes, margin=args.margin,
        schedule=lsm.ExponentialSchedule(beta0=100.0, scale=0.8, beta_min=1.0), device=device,
    )  # fmt: skip
    # One optimizer over both: DDP averages the backbone's gradients; the head's shard
    # gradient is exact on its own rank (x.grad carries the world-size factor for DDP).
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"{world_size} ranks ({dist.get_backend()}), {args.classes} classes; rank 0 holds "
              f"[{head.class_start}, {head.class_stop}), global batch {world_size * args.batch}")  # fmt: skip

    for step in range(args.steps):
        y = torch.randint(0, args.classes, (args.batch,), generator=samples)
        x = centres[y] + torch.randn(args.batch, args.in_features, generator=samples)
        loss = head(backbone(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.step()  # beta = schedule(iteration), on every rank
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  beta {head.beta:.2f}  "
                  f"{head.last_comm_bytes} bytes through collectives", flush=True)  # fmt: skip

    checkpoint = head.full_state_dict(dst=0)  # every rank takes part; the result is on rank 0
    if rank == 0 and args.save:
        torch.save(checkpoint, args.save)
        print(f"saved the full head ({args.classes} x {args.dim}) to {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Per-rank CPU memory of the class-parallel head's forward+backward against the
single-process fused head, for ``docs/distributed.md``.

    python -m bench.class_parallel_memory [--classes 1000000] [--dim 128] [--batch 64] [--ranks 2,4] [--json PATH]

For each world size P the head runs on a gloo group of P spawned processes (loopback,
FileStore), each rank holding 1/P of the classes and 1/P of the global batch of
``--batch`` rows; "single" is :class:`~lsoftmax_core.adapters.torch.LSoftmaxLoss` with
the whole weight in one process, no process group.  float32, one thread per process.

Measured per process, as :mod:`bench.memprobe` does (glibc's mmap threshold fixed at
64 KiB, so freed blocks go back to the OS and VmHWM resets to the current RSS): after a
warm-up step, ``step_mib`` is the peak resident size during one forward+backward above the
resident size before it (the weight's gradient, the gathered features, the logits' chunk,
the collectives' buffers and every temporary); ``weight_mib`` is the weight (shard) held
before the step, counted exactly from its size; ``total_mib`` their sum.  Prints one JSON
object per process and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from typing import Any

__all__ = ["main"]


def _step(head: Any, x: Any, target: Any) -> None:
    head(x, target).backward()


def _measure(rank: int, world_size: int, args: dict[str, Any], folder: str | None, queue: Any) -> None:
    import torch

    from bench.harness import peak_rss_delta

    torch.set_num_threads(1)
    c, d, n = args["classes"], args["dim"], args["batch"]
    if folder is None:
        from lsoftmax_core.adapters.torch import LSoftmaxLoss

        head: Any = LSoftmaxLoss(d, c, margin=4)
        rows = slice(0, n)
    else:
        import torch.distributed as dist

        from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=600),
        )  # fmt: skip
        head = ClassParallelLSoftmaxLoss(d, c, margin=4)
        per = n // world_size
        rows = slice(rank * per, (rank + 1) * per)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)[rows].contiguous().requires_grad_()
    target = torch.randint(0, c, (n,), generator=g)[rows].contiguous()
    _step(head, x, target)  # warm-up: one-time initialisation is not the step's memory
    # Freed before the measurement (a gradient freed inside it would offset the new one).
    head.weight.grad = x.grad = None
    step = peak_rss_delta(lambda: _step(head, x, target))
    weight = head.weight.numel() * head.weight.element_size() / 2**20
    queue.put({
        "ranks": "single" if folder is None else world_size, "rank": rank, "classes": c, "dim": d,
        "batch": n, "local_rows": x.shape[0], "local_classes": head.weight.shape[0],
        "weight_mib": round(weight, 1), "step_mib": round(step, 1), "total_mib": round(weight + step, 1),
    })  # fmt: skip
    if folder is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def _run(world_size: int | None, args: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="lsoftmax-mem-") as folder:
        p = 1 if world_size is None else world_size
        procs = [
            ctx.Process(target=_measure, args=(r, p, args, None if world_size is None else folder, queue))
            for r in range(p)
        ]
        for proc in procs:
            proc.start()
        rows = [queue.get(timeout=1800) for _ in procs]
        for proc in procs:
            proc.join(60)
    return sorted(rows, key=lambda r: r["rank"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.class_parallel_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split evenly over the ranks)")
    parser.add_argument("--ranks", default="2,4", help="world sizes, comma-separated")
    parser.add_argument("--json", help="also write the rows to this file")
    opts = parser.parse_args(argv)
    # Read by glibc at process start: the spawned processes inherit it.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    args = {"classes": opts.classes, "dim": opts.dim, "batch": opts.batch}
    rows = _run(None, args)
    for p in (int(s) for s in opts.ranks.split(",")):
        rows += _run(p, args)
    for row in rows:
        print(json.dumps(row), flush=True)
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    single = rows[0]["total_mib"]
    print("\n| ranks | rank | classes held | rows held | weight (MiB) | step peak (MiB) | total (MiB) | total / single |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['rank']} | {r['local_classes']:,} | {r['local_rows']} | {r['weight_mib']} | "
            f"{r['step_mib']} | {r['total_mib']} | {r['total_mib'] / single:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

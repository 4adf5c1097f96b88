"""The class-parallel memory suite: per-rank CPU memory of the class-parallel head's
forward+backward against the single-process fused head (``python -m bench class-parallel-memory``).

For each world size P (2 and 4) the head runs on a gloo group of P spawned processes
(loopback, FileStore), each rank holding 1/P of the classes and 1/P of the global batch
(the size's N rows, D features, C classes); "single" is :class:`~lsoftmax_core.adapters.torch.LSoftmaxLoss` with
the whole weight in one process, no process group.  float32, one thread per process.

Measured per process, as :mod:`bench.memprobe` does (glibc's mmap threshold fixed at
64 KiB, so freed blocks go back to the OS and VmHWM resets to the current RSS): after a
warm-up step, ``step_mib`` is the peak resident size during one forward+backward above the
resident size before it (the weight's gradient, the gathered features, the logits' chunk,
the collectives' buffers and every temporary); ``weight_mib`` is the weight (shard) held
before the step, counted exactly from its size; ``total_mib`` their sum.  Prints one JSON
object per process.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from .record import Options, Suite, table

__all__ = ["SUITE"]


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


def _run_ranks(world_size: int | None, args: dict[str, Any]) -> list[dict[str, Any]]:
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


COLUMNS = ("ranks", "rank", "classes", "dim", "batch", "local_rows", "local_classes", "weight_mib", "step_mib",
           "total_mib")
RANKS = (2, 4)


def _run(opts: Options) -> Iterator[list[dict[str, Any]]]:
    # Read by glibc at process start: the spawned processes inherit it.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for size in opts.sizes:
        args = {"classes": size.c, "dim": size.d, "batch": size.n}
        rows = _run_ranks(None, args)
        for p in RANKS:
            rows += _run_ranks(p, args)
        yield rows


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    single = {r["classes"]: r["total_mib"] for r in rows if r["ranks"] == "single"}
    return [*table(["ranks", "rank", "classes held", "rows held", "weight (MiB)", "step peak (MiB)", "total (MiB)",
                    "total / single"],
                   [[str(r["ranks"]), str(r["rank"]), f"{r['local_classes']:,}", str(r["local_rows"]),
                     str(r["weight_mib"]), str(r["step_mib"]), str(r["total_mib"]),
                     f"{r['total_mib'] / single[r['classes']]:.3f}" if single[r["classes"]] else "n/a"] for r in rows]), ""]


SUITE = Suite(
    name="class-parallel-memory", title="Class-parallel head: memory per rank", devices=("cpu",), columns=COLUMNS,
    table="class-parallel",
    about=("Per process, float32, one thread: `weight_mib` is the weight (shard) held, counted from its size; "
           "`step_mib` the peak resident size during one forward+backward above the resident size before it, "
           "after a warm-up step (glibc's mmap threshold fixed at 64 KiB); \"single\" is `LSoftmaxLoss` with the "
           "whole weight in one process."),
    run=_run, markdown=markdown,
)

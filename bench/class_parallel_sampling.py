"""The class-sampling suite: steps per second and peak memory per rank of the class-parallel
head's training step at ``sample_rate`` 1.0, 0.3 and 0.1 (``python -m bench class-parallel-sampling``).

Issue 26, item 4: on the CPU, a gloo group of 2 spawned processes (loopback, FileStore), one
thread each, float32; C = 1M classes of D = 128 features, 500k per rank, 64 rows per rank (a
global batch of 128).  Every configuration runs in a fresh group.  One step is what a
training loop does: ``optimizer.zero_grad()``, the head's forward and backward (the features
require grad, as a backbone's would), ``optimizer.step()`` with ``SGD(lr=0.01, momentum=0.9)``
over the head's weight (Partial FC v2, the default convention: the dense gradient, zero on
the unsampled rows).  Each step draws a new batch (its targets uniform over the classes).

Per rank, after ``warmup`` steps (the first creates the momentum buffer):

* memory, as :mod:`bench.class_parallel_memory` measures it (glibc's mmap threshold fixed at
  64 KiB, so freed blocks go back to the OS): ``step_mib`` is the peak resident size during
  one step above the resident size before it, the gradient freed before it; ``weight_mib``
  the weight shard, counted from its size; ``total_mib`` their sum.  ``state_mib`` is the
  momentum buffer, resident before the step and the same at every rate (not in the total);
* time: ``repeat`` steps, each after a barrier (the ranks start together, a step's time
  includes waiting for the other rank's collectives), the median per rank; ``fwd_bwd_ms``
  and ``opt_ms`` split it at ``backward()``'s return.  The goal reads the slower rank.

The goal (issue 26): at 0.1, at least 3x the steps per second of 1.0, with peak memory per
rank (``total_mib``) no higher.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from .record import Options, Suite, ok, table
from .sizes import Size

__all__ = ["SUITE"]

#: N is the global batch (64 rows per rank at 2 ranks).
SIZE = Size("cp-sampling-1m", 128, 128, 1_000_000, devices=("cpu",), table="class-parallel")
RANKS = 2
#: (margin, sample_rate) per configuration: L-Softmax m=4 at the three rates, ArcFace at 1.0
#: and 0.1 (the face-recognition margin Partial FC is used with).
CASES: tuple[tuple[str, float], ...] = (
    ("lsoftmax4", 1.0), ("lsoftmax4", 0.3), ("lsoftmax4", 0.1), ("arcface", 1.0), ("arcface", 0.1))
MARGIN_NAMES = {"lsoftmax4": "L-Softmax(4)", "arcface": "ArcFace(0.5, 64)"}
GOAL_SPEEDUP = 3.0


def _margin(name: str) -> Any:
    import lsoftmax_core as lsm

    return 4 if name == "lsoftmax4" else lsm.ArcFace(0.5, 64.0)


def _measure(rank: int, args: dict[str, Any], folder: str, queue: Any) -> None:
    try:
        queue.put(_measure_rank(rank, args, folder))
    except BaseException as e:  # the parent waits for every rank's row: send the failure instead
        queue.put({"rank": rank, "note": f"{type(e).__name__}: {e}"})
        raise


def _measure_rank(rank: int, args: dict[str, Any], folder: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    from .harness import peak_rss_delta, threads

    p, c, d, n = args["ranks"], args["classes"], args["dim"], args["batch"]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=p,
                            timeout=timedelta(seconds=600))
    with threads(1):
        torch.manual_seed(0)
        head = ClassParallelLSoftmaxLoss(d, c, margin=_margin(args["margin"]), sample_rate=args["rate"], seed=0)
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
        per = n // p
        steps = 0

        def batch() -> tuple[Any, Any]:
            # The same global batch on every rank at a step, this rank's rows of it.
            g = torch.Generator().manual_seed(1000 + steps)
            x = torch.randn(n, d, generator=g)[rank * per:(rank + 1) * per].contiguous().requires_grad_()
            return x, torch.randint(0, c, (n,), generator=g)[rank * per:(rank + 1) * per].contiguous()

        def step(x: Any, target: Any) -> float:
            """One training step; returns the time at backward()'s end."""
            opt.zero_grad(set_to_none=True)
            head(x, target).backward()
            mid = time.perf_counter()
            opt.step()
            return mid

        for _ in range(args["warmup"]):
            step(*batch())
            steps += 1
        opt.zero_grad(set_to_none=True)  # the gradient is made inside the measured step, not freed in it
        inputs = batch()
        dist.barrier()
        step_mib = peak_rss_delta(lambda: step(*inputs))
        steps += 1
        sampled = head.weight.shape[0] if head.last_sampled is None else head.last_sampled.numel()
        total, fwd_bwd, optim = [], [], []
        for _ in range(args["repeat"]):
            inputs = batch()
            dist.barrier()
            t0 = time.perf_counter()
            mid = step(*inputs)
            t1 = time.perf_counter()
            total.append(t1 - t0)
            fwd_bwd.append(mid - t0)
            optim.append(t1 - mid)
            steps += 1
        weight = head.weight.numel() * head.weight.element_size() / 2**20
        state = sum(v.numel() * v.element_size() for v in opt.state[head.weight].values()
                    if isinstance(v, torch.Tensor)) / 2**20
        dist.barrier()
    dist.destroy_process_group()
    median = statistics.median(total)
    return {
        "margin": args["margin"], "sample_rate": args["rate"], "ranks": p, "rank": rank, "classes": c, "dim": d,
        "batch_per_rank": per, "local_classes": head.weight.shape[0], "sampled_classes": sampled,
        "steps": len(total), "step_ms": median * 1e3, "fwd_bwd_ms": statistics.median(fwd_bwd) * 1e3,
        "opt_ms": statistics.median(optim) * 1e3, "steps_per_s": 1.0 / median,
        "weight_mib": round(weight, 1), "state_mib": round(state, 1), "step_mib": round(step_mib, 1),
        "total_mib": round(weight + step_mib, 1), "note": "",
    }  # fmt: skip


def _run_group(args: dict[str, Any]) -> list[dict[str, Any]]:
    import queue as queues
    import sys

    import torch.multiprocessing as mp

    from .record import REPO

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # A spawned rank unpickles its target by name (bench.class_parallel_sampling): it needs
    # this bench on its sys.path, which a run from tests/ (pytest, bench loaded from its file)
    # lacks.  The repository root goes last, as for the memory probe (record.cpu_memory), so
    # that the installed lsoftmax_core still comes first.
    path = list(sys.path)
    sys.path.append(str(REPO))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lsoftmax-sampling-") as folder:
        procs = [ctx.Process(target=_measure, args=(r, args, folder, queue)) for r in range(args["ranks"])]
        try:
            for proc in procs:
                proc.start()
        finally:
            sys.path[:] = path
        deadline = time.monotonic() + 1800
        try:
            while len(rows) < len(procs):
                try:
                    rows.append(queue.get(timeout=2))
                except queues.Empty:
                    # A rank that died before sending anything (an import error) must not
                    # leave the parent waiting out the deadline.
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        rows.append({"rank": -1, "note": f"a rank ended with exit code {dead[0]} before its result"
                                     if dead else "no result within 30 min"})
                        break
        finally:
            for proc in procs:
                proc.join(60 if not any(r.get("note") for r in rows) else 5)
                if proc.is_alive():  # a rank left waiting on a failed peer
                    proc.kill()
                    proc.join()
    failed = [r["note"] for r in rows if r.get("note")]
    if failed:  # a row without figures would be read as measured
        raise RuntimeError(f"class-parallel-sampling {args['margin']} at {args['rate']}: {'; '.join(failed)}")
    return sorted(rows, key=lambda r: r["rank"])


COLUMNS = ("margin", "sample_rate", "ranks", "rank", "classes", "dim", "batch_per_rank", "local_classes",
           "sampled_classes", "steps", "step_ms", "fwd_bwd_ms", "opt_ms", "steps_per_s", "weight_mib", "state_mib",
           "step_mib", "total_mib", "note")


def _run(opts: Options) -> Iterator[list[dict[str, Any]]]:
    # Read at process start (glibc's threshold, the BLAS pools): the spawned ranks inherit them.
    saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    try:
        for size in opts.sizes or (SIZE,):
            for margin, rate in CASES:
                yield _run_group({"margin": margin, "rate": rate, "ranks": RANKS, "classes": size.c, "dim": size.d,
                                  "batch": size.n, "warmup": opts.warmup, "repeat": opts.repeat})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _per_case(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (margin, rate): the slower rank's time and the larger peak."""
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for r in rows:
        key = (r["margin"], float(r["sample_rate"]))
        case = out.setdefault(key, {"rows": []})
        case["rows"].append(r)
    for case in out.values():
        slow = max(case["rows"], key=lambda r: float(r["step_ms"]))
        case.update(slow=slow, steps_per_s=float(slow["steps_per_s"]),
                    total_mib=max(float(r["total_mib"]) for r in case["rows"]),
                    step_mib=max(float(r["step_mib"]) for r in case["rows"]))
    return out


def _f(v: Any, fmt: str) -> str:
    return format(float(v), fmt) if ok(v) else "n/a"


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    cases = _per_case(rows)
    body = []
    for (margin, rate), case in cases.items():
        base = cases.get((margin, 1.0))
        s = case["slow"]
        body.append([
            MARGIN_NAMES.get(margin, margin), f"{rate:g}", f"{int(s['sampled_classes']):,} / {int(s['local_classes']):,}",
            _f(case["steps_per_s"], ".2f"), _f(case["steps_per_s"] / base["steps_per_s"], ".2f") + "x" if base else "n/a",
            _f(s["fwd_bwd_ms"], ".0f"), _f(s["opt_ms"], ".0f"), _f(s["weight_mib"], ".1f"), _f(case["step_mib"], ".1f"),
            _f(case["total_mib"], ".1f"),
            _f(case["total_mib"] - base["total_mib"], "+.1f") if base else "n/a"])  # fmt: skip
    out = [*table(["margin", "sample_rate", "classes sampled / held (rank)", "steps/s (slower rank)", "vs 1.0",
                   "fwd+bwd (ms)", "SGD step (ms)", "weight (MiB)", "step peak (MiB)", "peak per rank (MiB)",
                   "vs 1.0 (MiB)"], body), "",
           "Per rank:", "",
           *table(["margin", "sample_rate", "rank", "steps", "step (ms)", "steps/s", "momentum (MiB)",
                   "step peak (MiB)", "total (MiB)"],
                  [[MARGIN_NAMES.get(r["margin"], r["margin"]), f"{float(r['sample_rate']):g}", str(r["rank"]),
                    str(r["steps"]), _f(r["step_ms"], ".0f"), _f(r["steps_per_s"], ".2f"), _f(r["state_mib"], ".1f"),
                    _f(r["step_mib"], ".1f"), _f(r["total_mib"], ".1f")] for r in rows]), ""]
    goals = []
    for margin in dict.fromkeys(m for m, _ in cases):
        base, low = cases.get((margin, 1.0)), cases.get((margin, 0.1))
        if base is None or low is None:
            continue
        speed = low["steps_per_s"] / base["steps_per_s"]
        name = MARGIN_NAMES.get(margin, margin)
        goals.append([f"{name}: steps/s at 0.1 over 1.0", f">= {GOAL_SPEEDUP:g}x", f"{speed:.2f}x",
                      "met" if speed >= GOAL_SPEEDUP else "MISSED"])
        goals.append([f"{name}: peak per rank at 0.1", f"<= {base['total_mib']:.1f} MiB (1.0's)",
                      f"{low['total_mib']:.1f} MiB", "met" if low["total_mib"] <= base["total_mib"] else "MISSED"])
    if goals:
        out += ["## Goals (issue 26)", "", *table(["goal", "target", "measured", "status"], goals), ""]
    return out


SUITE = Suite(
    name="class-parallel-sampling", title="Class-parallel head: Partial-FC sampling, speed and memory per rank",
    devices=("cpu",), columns=COLUMNS, table=None,
    about=("gloo, 2 ranks on one machine, float32, one thread per process; C = 1M, D = 128, 64 rows per rank. A "
           "step: zero_grad, the head's forward and backward (features requiring grad), SGD(momentum=0.9).step() "
           "(Partial FC v2: the dense gradient). Time: the median of the timed steps per rank after the warm-up, "
           "each after a barrier; the summary reads the slower rank. Memory: `step peak` is the peak resident size "
           "during one step above the resident size before it (gradient freed before it; glibc's mmap threshold "
           "fixed at 64 KiB), `peak per rank` the weight shard plus that (the momentum buffer, the weight's size, "
           "is resident at every rate and not in it)."),
    run=_run, markdown=markdown, settings={"cpu": (7, 2, 0.0)},
)
